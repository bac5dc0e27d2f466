"""`silorec-client`: what a merchant runs next to its own data."""

from __future__ import annotations

from pathlib import Path

import click

from common.cli import CONTEXT, RoleGroup
from common.silo import load_silo
from common.summary import summarize


@click.group(cls=RoleGroup, context_settings=CONTEXT)
@click.version_option(package_name="silorec")
def main() -> None:
    """silorec merchant tools: check a silo's data before it takes part in a federation.

    A silo is a folder with an interactions file (user_id, item_id, timestamp[, event])
    and an items file (item_id, title[, category, brand, description]), as .csv,
    .parquet or RecBole atomic files (.inter, .item). Raw interactions never leave it.
    """


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
    click.secho("ok: the silo is valid", fg="green")
