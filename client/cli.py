"""`silorec-client`: what a merchant runs next to its own data."""

from __future__ import annotations

import json
from pathlib import Path

import click

from common.cli import CONTEXT, COUNT, RoleGroup, quiet_libraries
from common.silo import STATE_DIR, load_silo
from common.summary import summarize

DEFAULT_CACHE = Path("~/.cache/silorec/items").expanduser()
adapter_option = click.option(
    "--adapter",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Adapter folder written by silorec (peft format, with silorec_model.json).",
)
data_option = click.option("--data", type=click.Path(path_type=Path), required=True, help="The merchant's silo folder.")
state_option = click.option(
    "--state",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The merchant's state folder, whose local releases and item head complete a federation's adapter. "
    f"[default: SILO/{STATE_DIR}]",
)
cache_option = click.option(
    "--cache", type=click.Path(path_type=Path), default=DEFAULT_CACHE, show_default=True, help="Cache of item vectors."
)


@click.group(cls=RoleGroup, context_settings=CONTEXT)
@click.version_option(package_name="silorec")
def main() -> None:
    """silorec merchant tools: check a silo, serve and evaluate recommendations.

    A silo is a folder with an interactions file (user_id, item_id, timestamp[, event])
    and an items file (item_id, title[, category, brand, description]), as .csv,
    .parquet or RecBole atomic files (.inter, .item). Raw interactions never leave it.
    """
    quiet_libraries()


@main.command("check-data")
@click.argument("silo", type=click.Path(path_type=Path))
def check_data(silo: Path) -> None:
    """Validate the silo in folder SILO and print its summary.

    Exits 0 if the silo is valid; otherwise prints one line naming the file,
    line and field at fault, and exits 2.
    """
    summary = summarize(load_silo(silo))
    for line in summary.lines():
        click.echo(line)
    for warning in summary.warnings():
        click.secho(f"warning: {warning}", fg="yellow", err=True)
    click.secho("ok: the silo is valid", fg="green")


@main.command("recommend")
@adapter_option
@data_option
@click.option("--user", "user_id", help="A user id of the silo (or --all).")
@click.option("--all", "every_user", is_flag=True, help="Every user of the silo, written to --out.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --all: the file to write (.parquet or .csv): user_id, rank, item_id, title, score.",
)
@click.option("-k", "k", type=COUNT, default=10, show_default=True, help="How many items per user.")
@click.option("--repeats", is_flag=True, help="Also recommend items the user already has.")
@click.option("--batch-size", type=COUNT, default=256, show_default=True, help="Users scored in one pass (--all).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@state_option
@cache_option
def recommend(
    adapter: Path,
    data: Path,
    user_id: str | None,
    every_user: bool,
    out: Path | None,
    k: int,
    repeats: bool,
    batch_size: int,
    force: bool,
    state: Path | None,
    cache: Path,
) -> None:
    """Print the top-k items for one user of the silo, or write them for every user (--all --out FILE).

    Scores from each user's whole history. Items the user already interacted
    with are never recommended, unless --repeats.
    """
    import time

    from common.serve import SiloRecommender

    if every_user == (user_id is not None):
        raise click.UsageError("give one of --user ID and --all")
    if every_user and out is None:
        raise click.UsageError("--all writes a file: give --out recs.parquet (or .csv)")
    if out is not None and not every_user:
        raise click.UsageError("--out goes with --all; --user prints its answer")
    if out is not None and out.suffix not in (".parquet", ".csv"):
        raise click.UsageError(f"--out {out}: name a .parquet or .csv file")
    if out is not None and out.exists() and not force:
        raise click.UsageError(f"--out {out} exists: pass --force to replace it")
    served = SiloRecommender.load(adapter, data, cache_dir=cache, state_dir=state)
    if user_id is not None:
        history = served.history(user_id)
        last = served.title(served.model.item_ids[history[-1]])
        click.echo(f"user {user_id}: {len(history)} interactions, most recent: {last}")
        for rank, pick in enumerate(served.recommend_user(user_id, k, repeats=repeats), start=1):
            click.echo(f"{rank:>3}. {pick.score:8.3f}  {pick.title}  [{pick.item_id}]")
        return
    assert out is not None
    start = time.perf_counter()
    frame = served.export(k, repeats=repeats, batch_size=batch_size)
    seconds = time.perf_counter() - start
    write_table(frame, out)
    users = frame["user_id"].nunique()
    click.echo(
        f"wrote top-{k} of {users:,} users to {out} in {seconds:.1f} s ({users / max(seconds, 1e-9):,.1f} users/s, "
        f"{served.model.device.type})"
    )


def write_table(frame, out: Path) -> None:
    """`frame` as `out` (.parquet or .csv), all or nothing."""
    import io

    from common import atomic

    buffer = io.BytesIO()
    if out.suffix == ".parquet":
        frame.to_parquet(buffer, index=False)
    else:
        buffer.write(frame.to_csv(index=False).encode())
    atomic.write_bytes(out, buffer.getvalue())


@main.command("search")
@adapter_option
@data_option
@click.argument("query")
@click.option("-k", "k", type=COUNT, default=10, show_default=True, help="How many items.")
@cache_option
def search(adapter: Path, data: Path, query: str, k: int, cache: Path) -> None:
    """Print the silo's catalog ranked for a text QUERY (the item tower's cosine)."""
    from common.serve import SiloRecommender

    served = SiloRecommender.load(adapter, data, cache_dir=cache)
    for rank, pick in enumerate(served.search(query, k), start=1):
        click.echo(f"{rank:>3}. {pick.score:6.3f}  {pick.title}  [{pick.item_id}]")


@main.command("serve")
@adapter_option
@data_option
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (127.0.0.1: this machine only)."
)
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port to listen on.")
@click.option(
    "--api-key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A file holding the API key every request but /health must carry. [default: $SILOREC_API_KEY, else none]",
)
@click.option(
    "--refresh-seconds",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="How often to look for changed silo files (new products, new events); 0: never.",
)
@state_option
@cache_option
def serve(
    adapter: Path,
    data: Path,
    host: str,
    port: int,
    api_key_file: Path | None,
    refresh_seconds: float,
    state: Path | None,
    cache: Path,
) -> None:
    """Serve recommendations, search and similar items over HTTP as JSON.

    \b
      GET  /recommend?user=ID&k=10        a user of the silo, from their history
      POST /recommend {"items": [...], "k": 10}   a live session's items
      GET  /search?q=TEXT&k=10            the catalog ranked for a query
      GET  /items/ID/similar?k=10         the items nearest one item
      GET  /health

    Answers are {"items": [{"id", "title", "score"}, ...]}; errors are
    {"error", "field"} with a 4xx status. Loads the model once, re-reads the
    silo when its files change. Listens on 127.0.0.1 unless --host says
    otherwise; put it behind your TLS proxy before exposing it.
    """

    import uvicorn

    from client.service import create_app, read_api_key
    from common.serve import SiloRecommender

    api_key = read_api_key(api_key_file)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        click.secho(
            f"WARNING: serving on {host} without an API key: anyone who can reach it can query it.", fg="red", err=True
        )
    served = SiloRecommender.load(adapter, data, cache_dir=cache, state_dir=state)
    app = create_app(served, api_key=api_key, refresh_seconds=refresh_seconds)
    click.echo(
        f"silo {served.silo.name}: {len(served.users):,} users, {served.n_items:,} items; "
        f"serving on http://{host}:{port} (API key {'required' if api_key else 'off'}); Ctrl+C stops"
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


@main.command("load-test")
@click.option("--url", default="http://127.0.0.1:8080", show_default=True, help="The running service's address.")
@data_option
@click.option(
    "--seconds", type=click.FloatRange(min=0.5), default=10.0, show_default=True, help="Length of each phase."
)
@click.option(
    "--clients", type=COUNT, default=8, show_default=True, help="Concurrent clients of the throughput phases."
)
@click.option("-k", "k", type=COUNT, default=10, show_default=True, help="Items per answer.")
@click.option(
    "--api-key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The service's API key. [default: $SILOREC_API_KEY, else none]",
)
def load_test(url: str, data: Path, seconds: float, clients: int, k: int, api_key_file: Path | None) -> None:
    """Measure a running `serve`: latency of one client, then requests/s of --clients at once, for its users.

    Phases of --seconds each: GET /recommend for the silo's users (1 client,
    then --clients), POST /recommend with each user's 5 most recent items
    (--clients) and GET /search with each item's title (1 client).
    """
    import random
    from urllib.parse import quote

    from client.loadtest import Request, run_load
    from client.service import read_api_key
    from common.split import user_sequences

    api_key = read_api_key(api_key_file)
    silo = load_silo(data)
    users, sequences = user_sequences(silo.interactions)
    ids = list(silo.items["item_id"])
    rng = random.Random(0)
    order = rng.sample(range(len(users)), len(users))
    by_user = [Request("GET", f"/recommend?user={quote(users[u])}&k={k}") for u in order]
    sessions = [Request("POST", "/recommend", {"items": [ids[i] for i in sequences[u][-5:]], "k": k}) for u in order]
    searches = [Request("GET", f"/search?q={quote(str(t))}&k={k}") for t in silo.items["title"]]
    phases = [
        ("GET /recommend?user", by_user, 1),
        ("GET /recommend?user", by_user, clients),
        ("POST /recommend (session)", sessions, clients),
        ("GET /search", searches, 1),
    ]
    for what, requests, n in phases:
        click.echo(run_load(url, requests, clients=n, seconds=seconds, api_key=api_key).line(what))


@main.command("evaluate")
@adapter_option
@data_option
@state_option
@cache_option
def evaluate_cmd(adapter: Path, data: Path, state: Path | None, cache: Path) -> None:
    """Print full-ranking validation and test metrics of an adapter on a silo, as JSON (with MostPop)."""
    from common.metrics import evaluate, most_pop
    from common.serve import load_for_silo, scorer
    from common.split import leave_one_out

    silo = load_silo(data)
    split = leave_one_out(silo.interactions, silo.n_items)
    model = load_for_silo(adapter, silo, cache_dir=cache, state_dir=state)
    score = scorer(model)
    report = {
        "silo": silo.name,
        "adapter": str(adapter),
        "valid": evaluate(score, split.valid),
        "test": evaluate(score, split.test),
        "most_pop": most_pop(split),
    }
    click.echo(json.dumps(report, indent=2))


@main.command("start")
@click.option("--data", type=click.Path(path_type=Path), required=True, help="The merchant's silo folder.")
@click.option("--server", required=True, metavar="HOST:PORT", help="The coordinator's SuperLink address.")
@click.option(
    "--ca", type=click.Path(path_type=Path), help="The federation's CA certificate (ca.pem from the coordinator)."
)
@click.option(
    "--key", type=click.Path(path_type=Path), help="This merchant's node key (NAME.key from `silorec-server enroll`)."
)
@click.option(
    "--state",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Ledger, local head and Flower state. [default: SILO/.silorec-state]",
)
@click.option(
    "--port", type=int, default=9094, show_default=True, help="Local port of the node's Runtime API (127.0.0.1 only)."
)
@click.option(
    "--signing-key",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="This merchant's Ed25519 key (NAME.sign.key from `enroll`) to sign updates with. [default: beside --key, if "
    "there]",
)
@click.option(
    "--budget",
    type=click.FloatRange(min=0, min_open=True),
    default=8.0,
    show_default=True,
    help="The most ε this silo's users may spend, over every run (its ledger refuses past it); the node then "
    "takes part only in DP rounds, whatever the coordinator announces.",
)
@click.option(
    "--no-dp",
    "no_dp",
    is_flag=True,
    help="Take part in a run without differential privacy (no budget, no noise). Says so loudly.",
)
@click.option(
    "--record-outgoing",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep every message this node sends, byte for byte as sent, in this folder (check it with "
    "`silorec-client scan-outgoing`).",
)
@click.option("--insecure", is_flag=True, help="Local development only: no TLS and no node authentication.")
def start(
    data: Path,
    server: str,
    ca: Path | None,
    key: Path | None,
    state: Path | None,
    port: int,
    signing_key: Path | None,
    budget: float,
    no_dp: bool,
    record_outgoing: Path | None,
    insecure: bool,
) -> None:
    """Join the federation: run a Flower SuperNode that trains on the silo in DATA.

    The silo is validated first; raw interactions never leave it. The node
    verifies the SuperLink's certificate against --ca and proves its identity
    with --key. Runs until the federation ends it or Ctrl+C.
    """
    from client.node import NodeError, NodeSpec, check_files, run_supernode

    silo = load_silo(data)  # refuse a bad silo here, not in the middle of the first round
    if insecure:
        click.secho(
            "WARNING: --insecure: no TLS and no node authentication. Use only for local development.",
            fg="red",
            bold=True,
            err=True,
        )
    elif ca is None or key is None:
        raise NodeError("start needs --ca and --key (or --insecure for local development only)")
    if signing_key is None and key is not None and key.with_suffix(".sign.key").is_file():
        signing_key = key.with_suffix(".sign.key")
    if signing_key is not None and not signing_key.is_file():
        raise NodeError(f"signing key {signing_key} not found: it is NAME.sign.key from `silorec-server enroll`")
    if no_dp:
        click.secho(
            "WARNING: --no-dp: this node trains without differential privacy; its updates reveal its users' data.",
            fg="red",
            bold=True,
            err=True,
        )
    spec = NodeSpec(
        server,
        data,
        state or data / STATE_DIR,
        None if insecure else ca,
        None if insecure else key,
        port,
        signing_key,
        budget=None if no_dp else budget,
        record_outgoing=record_outgoing,
    )
    check_files(spec)
    click.echo(
        f"silo {silo.name}: valid; connecting to {server} ({'TLS, node key ' + str(key) if spec.secure else 'INSECURE'})"
    )
    code = run_supernode(spec)
    if code:
        raise SystemExit(code)


@main.command("scan-outgoing")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--data",
    "silos",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    multiple=True,
    required=True,
    help="A silo whose users and interactions to search for (repeatable).",
)
def scan_outgoing(folder: Path, silos: tuple[Path, ...]) -> None:
    """Search the messages a node recorded (`start --record-outgoing FOLDER`) for the silo's data.

    Looks for every user id and every interaction (as the silo's file stores
    it) in the bytes as sent, and for any tensor that travelled in the clear.
    Exits 1 if it finds one.
    """
    from client.outgoing import recorded, scan

    files = recorded(folder)
    if not files:
        raise click.UsageError(f"{folder} holds no recorded messages (*.msg)")
    result = scan(files, list(silos))
    click.echo(result.line())
    for line in (result.found + result.tensors)[:20]:
        click.echo("  " + line)
    if not result.clean:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
