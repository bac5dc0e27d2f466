"""The coordinator's Flower processes: start a SuperLink, register enrolled merchants, submit and watch a run.

Everything here drives Flower's own commands (`flower-superlink`, `flwr`) from
the same environment as silorec; nothing speaks Flower's wire protocol itself.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common.errors import SilorecError
from common.flower_env import flower_env, tool

CONNECTION = "silorec"  # the SuperLink connection's name in $FLWR_HOME/config.toml
APP_DIR = Path(__file__).resolve().parents[1]  # the Flower app: the project folder with pyproject.toml


class DeployError(SilorecError):
    """A Flower process could not be started, reached or told what to do."""


@dataclass(frozen=True)
class LinkSpec:
    """How to start one SuperLink: where it listens, its TLS files (None: insecure) and its state folder."""

    host: str
    port: int
    state: Path
    ca_cert: Path | None = None
    server_cert: Path | None = None
    server_key: Path | None = None

    @property
    def secure(self) -> bool:
        return self.ca_cert is not None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def flwr_home(self) -> Path:
        return self.state / "flwr-home"

    @property
    def database(self) -> Path:
        return self.state / "superlink.db"


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) → (host, port), with a clear error for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeployError(f"address {address!r} is not HOST:PORT (e.g. 0.0.0.0:9093 or 127.0.0.1:9093)")
    return host.strip("[]"), int(port)


def superlink_command(spec: LinkSpec) -> list[str]:
    """The `flower-superlink` command line: TLS and SuperNode authentication unless the spec is insecure."""
    cmd = [tool("flower-superlink"), "--host", spec.host, "--port", str(spec.port), "--database", str(spec.database)]
    if spec.secure:
        cmd += [
            "--ssl-ca-certfile",
            str(spec.ca_cert),
            "--ssl-certfile",
            str(spec.server_cert),
            "--ssl-keyfile",
            str(spec.server_key),
            "--enable-supernode-auth",
        ]
    else:
        cmd += ["--insecure"]
    return cmd


def start_superlink(spec: LinkSpec, *, timeout: float = 60.0) -> subprocess.Popen:
    """Start `flower-superlink` (log: <state>/superlink.log) and return once it accepts connections."""
    spec.state.mkdir(parents=True, exist_ok=True)
    spec.flwr_home.mkdir(parents=True, exist_ok=True)
    log = open(spec.state / "superlink.log", "ab")  # noqa: SIM115 - handed to the child, which outlives this call
    proc = subprocess.Popen(
        superlink_command(spec), env=flower_env(spec.flwr_home), stdout=log, stderr=subprocess.STDOUT, cwd=spec.state
    )
    log.close()
    try:
        wait_for_port(spec.host, spec.port, proc, timeout=timeout, log=spec.state / "superlink.log")
    except BaseException:
        stop(proc)
        raise
    write_connection(spec)
    return proc


def wait_for_port(host: str, port: int, proc: subprocess.Popen, *, timeout: float, log: Path) -> None:
    """Block until something listens on host:port, or fail if `proc` exits or the time runs out."""
    deadline = time.monotonic() + timeout
    probe = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeployError(f"flower-superlink exited with code {proc.returncode} before listening; see {log}")
        try:
            with socket.create_connection((probe, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise DeployError(f"flower-superlink did not listen on {host}:{port} within {timeout:.0f} s; see {log}")


def write_connection(spec: LinkSpec) -> Path:
    """Write $FLWR_HOME/config.toml so that `flwr` commands reach this SuperLink (as connection 'silorec')."""
    probe = "127.0.0.1" if spec.host in ("0.0.0.0", "") else spec.host
    lines = [
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f'address = "{probe}:{spec.port}"',
    ]
    lines += [f"root-certificates = {json.dumps(str(spec.ca_cert.resolve()))}"] if spec.secure else ["insecure = true"]
    path = spec.flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def register_merchants(spec: LinkSpec, registry: Mapping[str, str]) -> dict[str, str]:
    """Register every enrolled merchant's public key with the SuperLink; return merchant → node id ("" if known already)."""
    keys = spec.state / "enrolled-keys"
    keys.mkdir(parents=True, exist_ok=True)
    nodes = {}
    for merchant, public_key in sorted(registry.items()):
        path = keys / f"{merchant}.pub"
        path.write_text(public_key.strip() + "\n")
        reply = _flwr_json(spec, ["supernode", "register", str(path), CONNECTION, "--name", merchant])
        if reply.get("success"):
            nodes[merchant] = str(reply.get("node-id", ""))
        elif "already in use" in str(reply.get("error-message", "")):  # a restarted SuperLink keeps its database
            nodes[merchant] = ""
        else:
            raise DeployError(f"could not register {merchant}: {_last_line(reply.get('error-message', reply))}")
    return nodes


def submit_run(spec: LinkSpec, run_config: Mapping[str, object], app: Path = APP_DIR) -> str:
    """`flwr run` the silorec app on this SuperLink with `run_config` overrides; return the run id."""
    if not (Path(app) / "pyproject.toml").is_file():
        raise DeployError(
            f"{app} is not a Flower app folder (no pyproject.toml); pass --app with silorec's project folder"
        )
    overrides = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
    args = ["run", str(app), CONNECTION] + (["--run-config", overrides] if overrides else [])
    reply = _flwr_json(spec, args)
    if not reply.get("success"):
        raise DeployError(f"flwr run failed: {_last_line(reply.get('error-message', reply))}")
    return str(reply["run-id"])


def run_status(spec: LinkSpec, run_id: str) -> str:
    """The run's status as Flower reports it, e.g. 'running' or 'finished:completed'."""
    reply = _flwr_json(spec, ["ls", CONNECTION, "--run-id", run_id])
    runs = reply.get("runs") or []
    if not reply.get("success") or not runs:
        raise DeployError(f"could not read the status of run {run_id}: {_last_line(reply.get('error-message', reply))}")
    return str(runs[0]["status"])


def wait_for_run(spec: LinkSpec, run_id: str, link: subprocess.Popen, *, poll: float = 2.0) -> str:
    """Block until the run is finished (or the SuperLink dies); return its final status."""
    while True:
        if link.poll() is not None:
            raise DeployError(
                f"flower-superlink exited with code {link.returncode} during run {run_id}; see {spec.state / 'superlink.log'}"
            )
        status = run_status(spec, run_id)
        if status.startswith("finished"):
            return status
        time.sleep(poll)


def stop(proc: subprocess.Popen, *, grace: float = 10.0) -> None:
    """Stop a process this module started: SIGTERM, then SIGKILL after `grace` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _flwr_json(spec: LinkSpec, args: list[str]) -> dict:
    # `flwr ... --format json` exits 0 even on failure; the JSON's "success" says what happened
    done = subprocess.run(
        [tool("flwr"), *args, "--format", "json"],
        env=flower_env(spec.flwr_home),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=spec.state,
    )
    start = done.stdout.find("{")
    try:
        return (
            json.loads(done.stdout[start:])
            if start >= 0
            else {"success": False, "error-message": done.stderr or done.stdout}
        )
    except ValueError:
        return {"success": False, "error-message": done.stdout + done.stderr}


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def _last_line(text: object) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
