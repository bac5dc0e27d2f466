"""A merchant's Flower SuperNode: the `flower-supernode` process that runs silorec's ClientApp next to the silo."""

from __future__ import annotations

import json
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from client.outgoing import RECORD_ENV
from common.errors import SilorecError
from common.flower_env import flower_env, tool


class NodeError(SilorecError):
    """The SuperNode cannot be started as asked."""


@dataclass(frozen=True)
class NodeSpec:
    """One SuperNode: which SuperLink, which silo, its TLS root (None: insecure) and its node key."""

    server: str
    silo: Path
    state: Path
    ca_cert: Path | None = None
    key: Path | None = None
    port: int = 9094  # the SuperNode's local Runtime API, used by its ClientApp processes
    signing_key: Path | None = None  # the merchant's Ed25519 key: its ClientApp signs every sealed update
    budget: float | None = None  # the silo's ε ceiling; None: a node that takes part without DP (`--no-dp`)
    record_outgoing: Path | None = None  # where its ClientApp writes every message it sends (client.outgoing)

    @property
    def secure(self) -> bool:
        return self.ca_cert is not None


def check_files(spec: NodeSpec) -> None:
    """Fail with a clear line if the CA certificate or the node key is missing."""
    for what, path in (("CA certificate (--ca)", spec.ca_cert), ("node key (--key)", spec.key)):
        if spec.secure and (path is None or not path.is_file()):
            raise NodeError(
                f"{what} {path} not found: ask the coordinator's operator for it (`silorec-server certs` / `enroll`)"
            )


def supernode_command(spec: NodeSpec) -> list[str]:
    """The `flower-supernode` command line; the silo and state folders reach the ClientApp as node config."""
    pairs = [("data-path", spec.silo.resolve()), ("state-path", spec.state.resolve())]
    if spec.signing_key is not None:
        pairs.append(("signing-key", spec.signing_key.resolve()))
    pairs.append(("budget", spec.budget) if spec.budget is not None else ("no-dp", "true"))
    node_config = " ".join(f"{k}={json.dumps(str(v))}" for k, v in pairs)
    cmd = [tool("flower-supernode"), "--superlink", spec.server, "--node-config", node_config, "--port", str(spec.port)]
    if spec.secure:
        cmd += ["--root-certificates", str(spec.ca_cert), "--auth-supernode-private-key", str(spec.key)]
    else:
        cmd += ["--insecure"]
    return cmd


def run_supernode(spec: NodeSpec) -> int:
    """Run the SuperNode in the foreground until it exits or this process is stopped; return its exit code."""
    spec.state.mkdir(parents=True, exist_ok=True)
    extra = {RECORD_ENV: str(spec.record_outgoing.resolve())} if spec.record_outgoing is not None else {}
    proc = subprocess.Popen(supernode_command(spec), env=flower_env((spec.state / "flwr-home").resolve(), extra))
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.terminate())  # pass a stop on to the node
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
