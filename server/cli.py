"""`silorec-server`: what the federation's operator runs."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click
import tomllib

from common.cli import CONTEXT, RoleGroup
from common.errors import SilorecError
from common.modes import PRIVACY_MODES


@click.group(cls=RoleGroup, context_settings=CONTEXT)
@click.version_option(package_name="silorec")
def main() -> None:
    """silorec coordinator tools.

    The coordinator aggregates merchants' encrypted, DP-trained LoRA updates; it
    never sees a user id or an interaction. `certs` makes the federation's TLS
    certificates, `enroll` a merchant's node key, and `start` runs the SuperLink
    and submits the silorec run.
    """


@main.command("run-config")
def run_config_command() -> None:
    """Print the run config table of pyproject.toml, derived from the settings' declarations.

    Each key with its help and its default (federation mode's); set any of them
    with `silorec-server start --run-config K=V` or `flwr run . --run-config`.
    """
    from server.settings import run_config_toml

    click.echo(run_config_toml(), nl=False)


@main.command("certs")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for ca.pem, ca.key, server.pem, server.key.",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    metavar="NAME_OR_IP",
    help="Host name or IP address merchants use to reach the SuperLink (repeatable). [default: localhost, 127.0.0.1]",
)
@click.option("--force", is_flag=True, help="Replace existing files in --out.")
def certs(out: Path, hosts: tuple[str, ...], force: bool) -> None:
    """Make the federation's CA and the SuperLink's TLS certificate signed by it.

    Give every merchant ca.pem (public); keep ca.key and server.key on the
    coordinator (they are written with mode 0600).
    """
    from server.pki import DEFAULT_HOSTS, make_server_pki

    paths = make_server_pki(out, hosts or DEFAULT_HOSTS, force=force)
    click.echo(f"CA certificate  {paths.ca_cert}   (give to every merchant)")
    click.echo(f"CA key          {paths.ca_key}   (secret; keep offline if you can)")
    click.echo(f"server cert     {paths.server_cert}   (SANs: {', '.join(hosts or DEFAULT_HOSTS)})")
    click.echo(f"server key      {paths.server_key}   (secret)")


@main.command("enroll")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Enrolment folder (holds enrolled.json).",
)
@click.option("--merchant", required=True, help="The merchant's name (letters, digits, '.', '_', '-').")
@click.option(
    "--force",
    is_flag=True,
    help="Give an enrolled merchant a new key (the old one is no longer accepted at the next start).",
)
def enroll(out: Path, merchant: str, force: bool) -> None:
    """Make a merchant's SuperNode key pair and enrol its public key.

    Hand NAME.key to the merchant over a secure channel (it is their node's
    identity); `start --enrolled` registers every key in enrolled.json with the
    SuperLink, and the SuperLink refuses any node whose key is not there.
    """
    from server.pki import enroll_merchant

    e = enroll_merchant(out, merchant, force=force)
    click.echo(f"private key  {e.private_key}   (secret: give to {merchant} for `silorec-client start --key`)")
    click.echo(f"signing key  {e.signing_key}   (secret: give to {merchant} with it; updates are signed with it)")
    click.echo(f"public key   {e.public_key}")
    click.echo(f"enrolled in  {e.registry}")


@main.command("start")
@click.option(
    "--certs",
    "certs_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder written by `certs` (ca.pem, server.pem, server.key).",
)
@click.option(
    "--enrolled", type=click.Path(file_okay=False, path_type=Path), help="Enrolment folder written by `enroll`."
)
@click.option(
    "--address",
    default="0.0.0.0:9093",
    show_default=True,
    metavar="HOST:PORT",
    help="Where the SuperLink listens (Fleet, Control and Runtime APIs share it in Flower 1.42).",
)
@click.option(
    "--state",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/superlink"),
    show_default=True,
    help="The operator's state folder: SuperLink database and log, Flower's config (FLWR_HOME).",
)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), help="Run output folder (out-dir). [default: STATE/run]"
)
@click.option(
    "--run-config",
    "run_config",
    multiple=True,
    metavar="K=V",
    help="Override a [tool.flwr.app.config] value, e.g. num-server-rounds=5 (repeatable; V is TOML, bare text is a "
    "string).",
)
@click.option(
    "--privacy",
    type=click.Choice(PRIVACY_MODES),
    default=None,
    help="federation: one DP-SGD step a round over every merchant's users, noise added once through SecAgg+; "
    "silo: every merchant adds its own noise (set its preset too: see docs/operator.md). [default: the run config's, "
    "federation]",
)
@click.option(
    "--app",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The silorec project folder to run. [default: this installation's]",
)
@click.option(
    "--exit-after-run", is_flag=True, help="Stop the SuperLink when the run ends; exit 0 only if it completed."
)
@click.option("--insecure", is_flag=True, help="Local development only: no TLS and no node authentication.")
def start(
    certs_dir: Path | None,
    enrolled: Path | None,
    address: str,
    state: Path,
    out: Path | None,
    run_config: tuple[str, ...],
    privacy: str | None,
    app: Path | None,
    exit_after_run: bool,
    insecure: bool,
) -> None:
    """Start the SuperLink (TLS + SuperNode authentication), register enrolled merchants, submit the run.

    Keeps serving until interrupted (Ctrl+C), or with --exit-after-run until the
    run ends. Merchants connect with `silorec-client start --server HOST:PORT`.
    """
    from server import deploy, pki

    host, port = deploy.parse_address(address)
    state = state.resolve()
    if insecure:
        click.secho(
            "WARNING: --insecure: no TLS and no node authentication. Updates and metrics travel in clear text and "
            "any machine that can reach the port may join. Use only for local development.",
            fg="red",
            bold=True,
            err=True,
        )
        spec = deploy.LinkSpec(host, port, state)
        registry: dict[str, str] = {}
    else:
        if certs_dir is None or enrolled is None:
            raise SilorecError("start needs --certs and --enrolled (or --insecure for local development only)")
        files = [certs_dir / "ca.pem", certs_dir / "server.pem", certs_dir / "server.key"]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise pki.PkiError(f"missing {', '.join(missing)}: make them with `silorec-server certs --out {certs_dir}`")
        registry = pki.read_registry(enrolled)
        if not registry:
            raise pki.PkiError(
                f"no merchant is enrolled in {enrolled}: enrol one with `silorec-server enroll --out {enrolled} "
                f"--merchant NAME`"
            )
        spec = deploy.LinkSpec(host, port, state, *(f.resolve() for f in files))
    overrides = {"out-dir": str((out or state / "run").resolve()), **_parse_run_config(run_config)}
    if privacy is not None:
        overrides["privacy"] = privacy
    if enrolled is not None and (enrolled / pki.SIGNING_REGISTRY).is_file():
        # the ServerApp then accepts only updates signed by an enrolled merchant's Ed25519 key
        overrides.setdefault("signing-keys", str((enrolled / pki.SIGNING_REGISTRY).resolve()))

    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so that the finally below stops the SuperLink
    link = deploy.start_superlink(spec)
    try:
        click.echo(
            f"SuperLink listening on {spec.address} ({'TLS, node authentication' if spec.secure else 'INSECURE'}); "
            f"log {state / 'superlink.log'}"
        )
        for merchant, node in deploy.register_merchants(spec, registry).items():
            click.echo(f"registered {merchant}" + (f" (node {node})" if node else " (already registered)"))
        run_id = deploy.submit_run(spec, overrides, app or deploy.APP_DIR)
        click.echo(f"submitted run {run_id}; outputs in {overrides['out-dir']}")
        if exit_after_run:
            status = deploy.wait_for_run(spec, run_id, link)
            metrics = Path(overrides["out-dir"]) / "metrics.json"
            click.echo(f"run {run_id}: {status}")
            # `finished:completed` is reported even when the ServerApp raised; metrics.json is the proof of a real end
            if status != "finished:completed" or not metrics.is_file():
                raise SilorecError(
                    f"run {run_id} did not complete ({status}); see `flwr log {run_id}` with "
                    f"FLWR_HOME={spec.flwr_home}, or {state / 'superlink.log'}"
                )
            click.echo(
                json.dumps({"rounds": json.loads(metrics.read_text()).get("rounds"), "out": str(metrics.parent)})
            )
        else:
            click.echo("serving; Ctrl+C stops the SuperLink")
            link.wait()
    finally:
        deploy.stop(link)


def _parse_run_config(pairs: tuple[str, ...]) -> dict[str, object]:
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise SilorecError(f"--run-config {pair!r} is not K=V (e.g. num-server-rounds=5)")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw  # a bare path or word: a string
    return out


def _exit_on_sigterm(signum: int, frame: object) -> None:
    sys.exit(128 + signum)


if __name__ == "__main__":
    main()
