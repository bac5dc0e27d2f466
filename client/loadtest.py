"""A load test of a running `silorec-client serve`, bounded in time: latency of one client, throughput of many.

Each client is a thread holding one keep-alive HTTP connection and sending
its next request as soon as the last is answered, for a fixed number of
seconds. Latency is measured per request from send to the last byte.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: dict | None = None


@dataclass(frozen=True)
class Load:
    """What one load test measured."""

    clients: int
    seconds: float
    latencies: np.ndarray  # seconds, one per answered request
    errors: int

    @property
    def per_second(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile(self, q: float) -> float:
        """The q-th percentile of latency, in milliseconds."""
        return float(np.percentile(self.latencies, q) * 1000) if len(self.latencies) else float("nan")

    def line(self, what: str) -> str:
        return (
            f"{what}, {self.clients} client{'s' if self.clients > 1 else ''}: {len(self.latencies):,} requests in "
            f"{self.seconds:.1f} s, {self.per_second:,.1f} requests/s, latency p50 {self.percentile(50):.1f} ms, "
            f"p95 {self.percentile(95):.1f} ms, {self.errors} error{'s' if self.errors != 1 else ''}"
        )


def run_load(url: str, requests: list[Request], *, clients: int, seconds: float, api_key: str | None = None) -> Load:
    """Send `requests` (round-robin, each client from its own offset) from `clients` threads for `seconds`."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{url}: give the service's address as http://HOST:PORT")
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client(c: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=30)
        i = c * max(1, len(requests) // clients)
        start.wait()
        while time.perf_counter() < deadline[0]:
            r = requests[i % len(requests)]
            i += 1
            began = time.perf_counter()
            try:
                conn.request(r.method, r.path, body=json.dumps(r.body) if r.body is not None else None, headers=headers)
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                errors[c] += 1
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=30)
                continue
            if response.status == 200:
                latencies[c].append(time.perf_counter() - began)
            else:
                errors[c] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + seconds
    began = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    return Load(clients, elapsed, np.array([x for c in latencies for x in c]), sum(errors))
