"""`silorec-server`: what the federation's operator runs."""

from __future__ import annotations

import click

from common.cli import CONTEXT, RoleGroup


@click.group(cls=RoleGroup, context_settings=CONTEXT)
@click.version_option(package_name="silorec")
def main() -> None:
    """silorec coordinator tools.

    The coordinator aggregates merchants' encrypted, DP-trained LoRA updates; it
    never sees a user id or an interaction. Its commands (certificates,
    merchant enrolment, starting the SuperLink) arrive with the federation.
    """
