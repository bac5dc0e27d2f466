"""`silorec-client serve` as a shop calls it: a real server process, answered over real HTTP."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest

from common.serve import SiloRecommender
from simulations.synthetic import SyntheticSpec, make_synthetic_silo
from tests.test_serve import saved_adapter

KEY = "test-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, port: int, key: str | None = KEY) -> None:
        self.port, self.key = port, key

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def get(self, path: str) -> tuple[int, dict]:
        return self.call("GET", path)


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_bert):
    """One server for the module (it takes seconds to start); the test that changes its silo runs last."""
    tmp_path = tmp_path_factory.mktemp("service")
    synthetic_silo = make_synthetic_silo(tmp_path / "shop", SyntheticSpec(seed=0))
    adapter = saved_adapter(tmp_path / "adapter", tiny_bert, synthetic_silo)
    (tmp_path / "key").write_text(KEY + "\n")
    port = free_port()
    cmd = [sys.executable, "-m", "client.cli", "serve", "--adapter", str(adapter), "--data", str(synthetic_silo)]
    cmd += ["--port", str(port), "--api-key-file", str(tmp_path / "key"), "--refresh-seconds", "0.2"]
    cmd += ["--cache", str(tmp_path / "cache")]
    log = open(tmp_path / "serve.log", "w")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    client = Client(port)
    deadline = time.monotonic() + 120
    while True:
        try:
            if client.get("/health")[0] == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the service did not start:\n" + (tmp_path / "serve.log").read_text())
        time.sleep(0.2)
    local = SiloRecommender.load(adapter, synthetic_silo, cache_dir=tmp_path / "cache2")
    yield client, local, proc, synthetic_silo
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    log.close()


def ids(answer: dict) -> list[str]:
    return [entry["id"] for entry in answer["items"]]


def test_the_service_answers_as_the_python_api_does(service):
    client, local, _, _ = service
    status, health = client.get("/health")
    assert status == 200 and health == {"status": "ok", "users": len(local.users), "items": local.n_items}
    user = local.users[2]
    status, answer = client.get(f"/recommend?user={user}&k=5")
    assert status == 200 and ids(answer) == [p.item_id for p in local.recommend_user(user, 5)]
    assert set(answer["items"][0]) == {"id", "title", "score"}
    session = [local.model.item_ids[i] for i in local.history(user)[-3:]]
    status, answer = client.call("POST", "/recommend", {"items": session, "k": 4})
    assert status == 200 and ids(answer) == [p.item_id for p in local.recommend(session, 4)]
    text = "deluxe acme guitar"
    status, answer = client.get("/search?q=deluxe%20acme%20guitar&k=3")
    assert status == 200 and ids(answer) == [p.item_id for p in local.search(text, 3)]
    item = local.model.item_ids[7]
    status, answer = client.get(f"/items/{item}/similar?k=6")
    assert status == 200 and ids(answer) == [p.item_id for p in local.similar(item, 6)] and item not in ids(answer)


def test_bad_requests_are_4xx_naming_the_field(service):
    client, local, _, _ = service
    user = local.users[0]
    assert Client(client.port, key=None).get(f"/recommend?user={user}")[0] == 401
    assert Client(client.port, key="wrong").get(f"/recommend?user={user}")[0] == 401
    assert Client(client.port, key=None).get("/health")[0] == 200
    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=30)
    conn.request("GET", f"/recommend?user={user}", headers={"authorization": f"bearer {KEY}"})  # any case
    response = conn.getresponse()
    assert response.status == 200 and response.read()
    conn.request("GET", f"/recommend?user={user}")
    response = conn.getresponse()
    assert response.status == 401 and response.getheader("WWW-Authenticate") == "Bearer"
    conn.close()
    cases = [
        ("GET", f"/recommend?user={user}&k=0", None, 422, "k"),
        ("GET", "/recommend?user=nobody", None, 404, "user"),
        ("GET", "/recommend", None, 422, "user"),
        ("POST", "/recommend", {"items": "not a list"}, 422, "items"),
        ("POST", "/recommend", {"items": ["no-such-item"]}, 404, "items"),
        ("GET", "/search?q=", None, 422, "q"),
        ("GET", "/items/no-such-item/similar", None, 404, "item_id"),
    ]
    cases += [("GET", "/no-such-route", None, 404, None), ("DELETE", "/health", None, 405, None)]
    for method, path, body, status, field in cases:
        got, answer = client.call(method, path, body)
        assert (got, answer.get("field")) == (status, field), (path, answer)
        assert answer["error"]


def test_concurrent_clients_get_the_answers_one_client_gets(service):
    client, local, _, _ = service
    users = local.users[:16]
    expected = {u: [p.item_id for p in local.recommend_user(u, 5)] for u in users}

    def ask(i: int) -> bool:
        user = users[i % len(users)]
        status, answer = client.get(f"/recommend?user={user}&k=5")
        return status == 200 and ids(answer) == expected[user]

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(ask, range(80)))


def test_load_test_measures_the_running_service(service):
    from click.testing import CliRunner

    from client.cli import main as client_cli

    client, _, _, silo = service
    key = silo.parent / "key"
    args = ["load-test", "--url", f"http://127.0.0.1:{client.port}", "--data", str(silo), "--seconds", "1"]
    done = CliRunner().invoke(client_cli, [*args, "--clients", "3", "--api-key-file", str(key)])
    assert done.exit_code == 0, done.output
    lines = done.output.splitlines()
    assert len(lines) == 4 and all(", 0 errors" in line for line in lines), done.output
    assert "3 clients" in lines[1] and "p95" in lines[1]
    refused = CliRunner().invoke(client_cli, [*args, "--clients", "2"])  # no key: every request refused, and said
    assert refused.exit_code == 0, refused.output
    for line in refused.output.splitlines():
        answered, errors = re.search(r" ([\d,]+) requests in .*, ([\d,]+) errors?$", line).groups()
        assert answered == "0" and int(errors.replace(",", "")) > 0, line


def test_a_product_added_to_the_items_file_is_served_without_a_restart(service):
    client, _, proc, silo = service
    items = pd.read_csv(silo / "items.csv", dtype=str, keep_default_na=False)
    new = items.iloc[[0]].assign(item_id="just-added", title="vintage zenith banjo 9")
    pd.concat([items, new]).to_csv(silo / "items.csv", index=False)
    deadline = time.monotonic() + 60
    while client.get("/health")[1]["items"] != len(items) + 1:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    status, answer = client.get("/search?q=vintage%20zenith%20banjo%209&k=1")
    assert status == 200 and ids(answer) == ["just-added"]
    # a half-written items file is not served; the last good catalog is
    (silo / "items.csv").write_text("item_id,title\njust-added\n")
    time.sleep(1.0)
    assert client.get("/health")[1]["items"] == len(items) + 1 and proc.poll() is None


def test_the_batcher_answers_each_request_its_own_k_and_passes_errors_to_every_waiter():
    import threading

    import numpy as np

    from client.service import Batcher, Unavailable
    from common.serve import Pick

    calls = []
    release = threading.Event()

    def score(histories, k, repeats):
        release.wait(5)
        calls.append((len(histories), k, list(repeats)))
        if any(len(h) == 0 for h in histories):
            raise ValueError("empty history")
        return [[Pick(f"{int(h[0])}-{j}", "", 0.0) for j in range(k)] for h in histories]

    batcher = Batcher(score, timeout=10)
    with pytest.raises(Unavailable):
        batcher.ask(np.array([1]), 3, False)  # not started yet
    batcher.start()
    with ThreadPoolExecutor(max_workers=6) as pool:
        asks = [pool.submit(batcher.ask, np.array([i]), 1 + i % 3, bool(i % 2)) for i in range(6)]
        time.sleep(0.3)  # all six are waiting while the first batch is held
        release.set()
        answers = [a.result() for a in asks]
    assert [len(a) for a in answers] == [1 + i % 3 for i in range(6)]
    assert all(a[0].item_id.startswith(f"{i}-") for i, a in enumerate(answers))
    assert len(calls) < 6  # batched: fewer passes than requests
    with pytest.raises(ValueError, match="empty history"):
        batcher.ask(np.array([], dtype=np.int64), 2, False)
    batcher.close()
    with pytest.raises(Unavailable):
        batcher.ask(np.array([1]), 3, False)
