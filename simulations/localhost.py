"""A federation deployed on this machine as its operator and merchants would run it, and where its time went.

The coordinator comes from `silorec-server certs`, `enroll` and `start`, each
merchant from its own `silorec-client start`, every one its own process, over
TLS on 127.0.0.1: a SuperLink, the ServerApp it starts, and one SuperNode (with
its ClientApp processes) per merchant silo. Where `silorec-sim run` runs every
merchant inside Ray, this is the real deployment, so it also runs where Ray is
not installed (the GPU check, `simulations/gpu_check.sh`).

Its overhead (`overhead`), round by round: the round's wall time at the
coordinator (metrics.jsonl) against the slowest merchant's own compute in it
(each merchant's local timing.jsonl, which only a machine holding every silo
can read), the seconds of each SecAgg+ stage, and the bytes each merchant sent
(`--record-outgoing`) and the coordinator received.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import atomic
from common.errors import SilorecError
from common.silo import STATE_DIR

SERVER = [sys.executable, "-m", "server.cli"]
CLIENT = [sys.executable, "-m", "client.cli"]
OVERHEAD_FILE = "overhead.json"


@dataclass(frozen=True)
class LocalSpec:
    silos: Sequence[Path]  # one merchant each
    out: Path
    run_config: Sequence[str] = ()  # K=V pairs for `silorec-server start --run-config`
    no_dp: bool = False
    timeout: float = 3600.0  # seconds the whole run may take


class Processes:
    """The processes this deployment started, each in its own session with its own log; stops only those."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.started[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def stop_all(self, grace: float = 15.0) -> None:
        for proc in self.started.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace
        for proc in self.started.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_localhost(spec: LocalSpec, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Enrol one merchant per silo, start the coordinator and the merchants, wait for the run; its overhead."""
    from server import pki

    out = spec.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = {silo.name: silo for silo in spec.silos}
    if len(names) != len(spec.silos):
        raise SilorecError("every merchant silo needs its own folder name: it names the merchant")
    certs, enrolled = out / "pki", out / "enrolled"
    pki.make_server_pki(certs)
    keys = {name: pki.enroll_merchant(enrolled, name).private_key for name in names}
    port = free_port()
    earlier = {name: len(timing_lines(silo)) for name, silo in names.items()}
    processes = Processes(out / "logs")
    server = processes.start(
        "server",
        [*SERVER, "start", "--certs", str(certs), "--enrolled", str(enrolled), "--address", f"127.0.0.1:{port}"]
        + ["--state", str(out / "server-state"), "--out", str(out / "run"), "--exit-after-run"]
        # the census waits for every merchant (an override after it wins)
        + ["--run-config", f"min-available-clients={len(names)}"]
        + [arg for pair in spec.run_config for arg in ("--run-config", pair)]
        + (["--run-config", "no-dp=true"] if spec.no_dp else []),
    )
    started = time.perf_counter()
    try:
        last = sorted(names)[-1]
        _wait_for(lambda: f"registered {last}" in processes.log("server"), server, 120, "the merchants' registration")
        log(f"coordinator on 127.0.0.1:{port}; starting {len(names)} merchants (logs in {processes.logs})")
        for name, silo in sorted(names.items()):
            processes.start(
                name,
                [*CLIENT, "start", "--data", str(silo), "--server", f"127.0.0.1:{port}", "--ca", str(certs / "ca.pem")]
                + ["--key", str(keys[name]), "--port", str(free_port()), "--record-outgoing", str(out / "sent" / name)]
                + (["--no-dp"] if spec.no_dp else []),
            )
        try:
            code = server.wait(timeout=spec.timeout)
        except subprocess.TimeoutExpired:
            raise SilorecError(f"the run took longer than {spec.timeout:.0f} s; see {processes.logs}") from None
        if code != 0:
            raise SilorecError(f"the coordinator exited {code}: {processes.log('server')[-2000:]}")
    finally:
        processes.stop_all()
    report = overhead(out / "run", names, out / "sent", skip=earlier) | {
        "wall_seconds": round(time.perf_counter() - started, 1)
    }
    atomic.write_json(out / OVERHEAD_FILE, report)
    return report


def _wait_for(ready: Callable[[], bool], proc: subprocess.Popen, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        if proc.poll() is not None:
            raise SilorecError(f"the coordinator exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise SilorecError(f"no {what} within {seconds:.0f} s")
        time.sleep(0.5)


def timing_lines(silo: Path) -> list[dict[str, Any]]:
    """The merchant's own record of how long each of its federation steps took (it never leaves the silo)."""
    path = silo / STATE_DIR / "timing.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def overhead(
    run: Path, silos: dict[str, Path], sent: Path | None = None, *, skip: dict[str, int] | None = None
) -> dict[str, Any]:
    """Each round's wall time against its slowest merchant's own compute, SecAgg+'s stages, and bytes per merchant.

    `skip`: timing lines of each silo that earlier runs wrote. Rounds that
    also validated are left out of the ratio: their merchants' evaluation is
    not in the timing files.
    """
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    compute: dict[int, dict[str, float]] = {}
    for name, silo in silos.items():
        for entry in timing_lines(silo)[(skip or {}).get(name, 0) :]:
            compute.setdefault(int(entry["round"]), {})[name] = float(entry["seconds"])
    rounds = []
    for line in lines:
        rnd = int(line["round"])
        if rnd == 0 or "seconds" not in line or "abandoned" in line:
            continue
        mine = compute.get(rnd, {})
        slowest = max(mine.values(), default=None)
        stages = (line.get("secagg") or {}).get("seconds") or {}
        rounds.append(
            {
                "round": rnd,
                "seconds": float(line["seconds"]),
                "slowest_merchant_seconds": slowest,
                "ratio": None if not slowest else round(float(line["seconds"]) / slowest, 3),
                "validated": "valid" in line,
                "secagg_seconds": stages,
                "bytes_received": line.get("bytes_received"),
                "merchants": line.get("accepted"),
            }
        )
    training = [r for r in rounds if not r["validated"] and r["ratio"] is not None]
    sent_bytes = {}
    if sent is not None:
        for name in silos:
            files = sorted((sent / name).glob("*.msg")) if (sent / name).is_dir() else []
            sent_bytes[name] = {"messages": len(files), "bytes": sum(f.stat().st_size for f in files)}
    return {
        "rounds": rounds,
        "median_ratio": _median([r["ratio"] for r in training]),
        "median_round_seconds": _median([r["seconds"] for r in training]),
        "median_slowest_merchant_seconds": _median([r["slowest_merchant_seconds"] for r in training]),
        "sent": sent_bytes,
    }


def _median(values: Sequence[float]) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def table(report: dict[str, Any]) -> str:
    """The overhead report as a console table: one line a round, then the medians and each merchant's bytes."""
    lines = [f"{'round':>5}  {'wall s':>7}  {'slowest merchant s':>18}  {'ratio':>6}  {'SecAgg+ stages s':<40}"]
    for r in report["rounds"]:
        stages = ", ".join(f"{k} {v:.2f}" for k, v in r["secagg_seconds"].items())
        slowest = "-" if r["slowest_merchant_seconds"] is None else f"{r['slowest_merchant_seconds']:.2f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        note = "  (validated)" if r["validated"] else ""
        lines.append(f"{r['round']:>5}  {r['seconds']:>7.2f}  {slowest:>18}  {ratio:>6}  {stages}{note}")
    if report["median_ratio"] is not None:
        lines.append(
            f"median over training rounds: {report['median_round_seconds']:.2f} s a round, slowest merchant "
            f"{report['median_slowest_merchant_seconds']:.2f} s, ratio {report['median_ratio']:.2f}"
        )
    for name, s in sorted(report.get("sent", {}).items()):
        lines.append(f"{name}: sent {s['messages']} messages, {s['bytes']:,} bytes")
    return "\n".join(lines)
