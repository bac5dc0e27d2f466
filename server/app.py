"""silorec ServerApp: the coordinator's side of the federation (Flower Message API).

Settings come from the run config (`[tool.flwr.app.config]` in pyproject.toml,
overridable with `flwr run . --run-config "k=v"`); the round loop lives in
`server.federation`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.errors import SilorecError
from server.federation import run_federation
from server.grid import PromptGrid
from server.sealing import STATE_KEY_ENV
from server.settings import ServerSettings


def make_app(overrides: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is the context's, with `overrides` on top (used by simulations)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = ServerSettings.from_run_config({**dict(context.run_config), **(overrides or {})})
        run_federation(PromptGrid(grid), context, settings, state_key=state_key(settings))

    return app


def state_key(settings: ServerSettings) -> bytes | None:
    """The operator's key for the run's sealing key at rest: `state-key-file`, else $SILOREC_STATE_KEY."""
    if settings.state_key_file:
        try:
            return Path(settings.state_key_file).expanduser().read_bytes().strip() or None
        except OSError as e:
            raise SilorecError(f"state-key-file {settings.state_key_file}: {e.strerror}") from None
    return os.environ.get(STATE_KEY_ENV, "").encode() or None


app = make_app()
