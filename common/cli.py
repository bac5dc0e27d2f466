"""What the three command-line tools share: one click group that reports errors as one line."""

from __future__ import annotations

import sys
from typing import Any

import click

from common.errors import SilorecError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class RoleGroup(click.Group):
    """A click group whose commands turn silorec's typed errors into one line on stderr and exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (SilorecError, FileExistsError) as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)
