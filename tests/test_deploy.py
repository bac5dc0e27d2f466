"""A real deployment on 127.0.0.1: SuperLink and SuperNodes as separate processes, TLS and node authentication on.

Certificates and keys come from `silorec-server certs|enroll`; the SuperLink
and the SuperNodes from `silorec-server start` and `silorec-client start`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from peft import PeftModel
from safetensors.numpy import load_file

from client.cli import main as client_main
from client.outgoing import hits, needles, recorded, scan
from common.encoder import load_encoder
from server.cli import main as server_main
from simulations.synthetic import SyntheticSpec, make_synthetic_silo
from tests.helpers import distinctive_user_ids

BIN = Path(sys.executable).parent
ROUNDS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (Flower detaches its SuperExec into its own session, out of our group)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class Processes:
    """The processes this test starts, each in its own session, each ended by its pid (and its descendants')."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - the child writes it
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        self.started[name] = proc
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL one process we started and its descendants: a merchant's machine lost mid-round."""
        proc = self.started[name]
        tree = _descendants(proc.pid)
        proc.kill()
        proc.wait()
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        tree = {name: _descendants(p.pid) for name, p in self.started.items()}
        for p in self.started.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in self.started.items():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            for pid in tree[name]:  # only processes that descended from one we started
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def processes(tmp_path):
    (tmp_path / "logs").mkdir()
    procs = Processes(tmp_path / "logs")
    try:
        yield procs
    finally:
        procs.stop_all()


def _wait_for(predicate, timeout: float, what: str, procs: Processes) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}:\n" + procs.log("server")[-3000:])


NODES = (("shop-a", "silo-a"), ("shop-b", "silo-b"), ("shop-c", "silo-c"))  # the enrolled merchants and their silos


def test_enrolled_merchants_train_in_federation_mode_over_tls_past_one_killed_mid_run_and_a_rogue_is_refused(
    tmp_path, tiny_bert, processes
):
    runner = CliRunner()
    pki, enrolled, rogue_dir = tmp_path / "pki", tmp_path / "enrolled", tmp_path / "rogue"
    assert runner.invoke(server_main, ["certs", "--out", str(pki)]).exit_code == 0
    for merchant in ("shop-a", "shop-b", "shop-c"):
        assert runner.invoke(server_main, ["enroll", "--out", str(enrolled), "--merchant", merchant]).exit_code == 0
    # a key made the same way but never enrolled with this federation
    assert runner.invoke(server_main, ["enroll", "--out", str(rogue_dir), "--merchant", "rogue"]).exit_code == 0
    silos = {
        name: distinctive_user_ids(make_synthetic_silo(tmp_path / name, SyntheticSpec(users=40, seed=i)))
        for i, name in enumerate(("silo-a", "silo-b", "silo-c", "silo-rogue"), start=1)
    }

    port, out, state = _free_port(), tmp_path / "run", tmp_path / "server-state"
    server = processes.start(
        "server",
        [
            str(BIN / "silorec-server"),
            "start",
            "--certs",
            str(pki),
            "--enrolled",
            str(enrolled),
            "--address",
            f"127.0.0.1:{port}",
            "--state",
            str(state),
            "--out",
            str(out),
            "--exit-after-run",
            "--run-config",
            f"num-server-rounds={ROUNDS}",
            "--run-config",
            f"base-model={tiny_bert}",
            "--run-config",
            "batch-size=16",
            "--run-config",
            "delta=1e-3",
            "--run-config",
            f"eval-every={ROUNDS}",
            "--run-config",
            "threads=1",
            # every round needs two of the three merchants, so one lost mid-run leaves enough for a round
            "--run-config",
            "min-replies=2",
            "--run-config",
            "min-available-clients=3",
        ],
    )
    # a node whose key is not registered yet is refused, so the merchants start once both keys are in
    _wait_for(
        lambda: "registered shop-c" in processes.log("server") or server.poll() is not None,
        60,
        "the merchants' registration",
        processes,
    )
    assert server.poll() is None, processes.log("server")

    def node(name: str, silo: str, key: Path):
        return processes.start(
            name,
            [
                str(BIN / "silorec-client"),
                "start",
                "--data",
                str(silos[silo]),
                "--server",
                f"127.0.0.1:{port}",
                "--ca",
                str(pki / "ca.pem"),
                "--key",
                str(key),
                "--port",
                str(_free_port()),
                "--record-outgoing",
                str(tmp_path / "sent" / name),
            ],
        )

    rogue = node("rogue", "silo-rogue", rogue_dir / "rogue.key")
    for name, silo in NODES:
        node(name, silo, enrolled / f"{name}.key")

    rogue_code = rogue.wait(timeout=60)
    assert rogue_code != 0, processes.log("rogue")
    assert "Failed to activate SuperNode" in processes.log("rogue")

    # shop-c's SuperNode dies once round 0 (census and releases) is checkpointed: in round 1 or just before it
    _wait_for(
        lambda: (out / "checkpoint" / "state.json").is_file() or server.poll() is not None,
        600,
        "round 0",
        processes,
    )
    processes.kill("shop-c")

    server.wait(timeout=900)
    assert server.returncode == 0, processes.log("server")[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rounds"] == ROUNDS
    assert sorted(m["silo"] for m in metrics["merchants"]) == ["silo-a", "silo-b"]  # the survivors; never the rogue
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2]
    assert lines[0]["census"]["merchants"] == 3  # shop-c took part in the census and the releases
    assert all("silo-rogue" not in line.get("epsilon", {}) for line in lines)
    # the round shop-c died in completes with the other two or is abandoned cleanly; the next runs with them
    assert lines[1]["accepted"] == 2 or "abandoned" in lines[1], lines[1]
    assert lines[2]["accepted"] == 2 and "abandoned" not in lines[2], lines[2]
    assert sorted(lines[2]["epsilon"]) == ["silo-a", "silo-b"]
    # federation mode: each round one secure sum of the merchants' noise shares, accounted once and in every ledger
    assert (
        metrics["privacy"]["mode"] == "federation"
        and metrics["privacy"]["steps"] == ROUNDS
        and metrics["secure_aggregation"]
    )
    assert all(eps == pytest.approx(metrics["privacy"]["epsilon"]) for eps in lines[-1]["epsilon"].values())
    # accepted although the run demanded updates signed with the merchants' enrolled Ed25519 keys
    assert metrics["sealed"] and metrics["config"]["server"]["signing_keys"].endswith("signing.json")
    PeftModel.from_pretrained(load_encoder(str(tiny_bert))[1], str(out / "adapter"))

    # the relay's database must hold only ciphertext: no raw bytes of the LoRA tensors it carried
    final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    stored = b"".join(p.read_bytes() for p in state.glob("superlink.db*"))
    assert stored, "the SuperLink wrote no database"
    leaked = [name for name, t in final.items() if t.tobytes()[:64] in stored]
    assert not leaked, f"the SuperLink database holds raw bytes of LoRA tensors: {leaked}"
    # nothing a merchant sent, and nothing the relay stored, holds a user id, an interaction or a clear tensor
    sent = [(silos[silo], recorded(tmp_path / "sent" / name)) for name, silo in NODES]
    for silo, files in sent:
        result = scan(files, [silo])
        print(f"{silo.name} sent {result.line()}")
        assert files and result.clean, result.found[:3] + result.tensors[:3]
    users, interactions = (sum(x, []) for x in zip(*(needles(silos[s]) for _, s in NODES)))
    in_db = [n.decode() for n in hits(stored, users + interactions)]
    print(
        f"SuperLink database: {len(stored):,} bytes; searched for {len(users)} user ids and {len(interactions)} "
        f"interactions: {len(in_db)} found"
    )
    assert not in_db, in_db[:3]


def test_a_merchant_with_an_invalid_silo_is_refused_before_any_process_starts(tmp_path):
    silo = make_synthetic_silo(tmp_path / "shop", SyntheticSpec(users=20, seed=0))
    (silo / "items.csv").write_text("item_id,title\n")  # an empty catalog
    done = CliRunner().invoke(
        client_main,
        [
            "start",
            "--data",
            str(silo),
            "--server",
            "127.0.0.1:1",
            "--ca",
            str(tmp_path / "ca.pem"),
            "--key",
            str(tmp_path / "k.key"),
        ],
    )
    assert done.exit_code == 2, done.output
    assert done.output.startswith("error: ") and "catalog" in done.output and len(done.output.strip().splitlines()) == 1
