"""silorec ServerApp: the coordinator's side of the federation (Flower Message API).

Settings come from the run config (`[tool.flwr.app.config]` in pyproject.toml,
overridable with `flwr run . --run-config "k=v"`); the round loop lives in
`server.federation`.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import run_federation
from server.settings import ServerSettings


def make_app(overrides: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is the context's, with `overrides` on top (used by simulations)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = ServerSettings.from_run_config({**dict(context.run_config), **(overrides or {})})
        run_federation(grid, settings)

    return app


app = make_app()
