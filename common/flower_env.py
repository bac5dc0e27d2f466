"""How silorec starts Flower's own commands (`flower-superlink`, `flower-supernode`, `flwr`).

Both roles run them from silorec's environment, so that they match the flwr
that silorec imports, and never let Flower install dependencies at run time.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path


def tool(name: str) -> str:
    """A Flower command from this environment (beside this Python), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a Flower command: its own FLWR_HOME, this venv's tools first, no `uv sync` at run time."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(flwr_home)
    # the app's dependencies are this environment's; letting Flower `uv sync` could pull a CUDA torch
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env
