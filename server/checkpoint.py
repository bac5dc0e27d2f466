"""The coordinator's checkpoint: after every round, the global adapter and where the run stands.

The adapter file is written first under a round-specific name, then
`state.json`, which names it, replaces the previous one atomically: it is the
commit point. A coordinator killed at any moment restarts from the last
complete round.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file
from safetensors.numpy import save as to_bytes

from common import atomic

STATE_FILE = "state.json"


@dataclass
class Checkpoint:
    run_id: str
    round: int
    global_arrays: dict[str, np.ndarray]
    history: list[dict[str, Any]] = field(default_factory=list)
    strategy: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # the strategy's own tensors (an optimiser's moments)


def save(folder: Path, ckpt: Checkpoint) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    name = f"global-round-{ckpt.round:04d}.safetensors"
    atomic.write_bytes(folder / name, to_bytes({k: np.ascontiguousarray(v) for k, v in ckpt.global_arrays.items()}))
    state = {
        "run_id": ckpt.run_id,
        "round": ckpt.round,
        "adapter": name,
        "history": ckpt.history,
        "strategy": ckpt.strategy,
    }
    if ckpt.arrays:
        state["arrays"] = f"server-round-{ckpt.round:04d}.safetensors"
        atomic.write_bytes(
            folder / state["arrays"], to_bytes({k: np.ascontiguousarray(v) for k, v in ckpt.arrays.items()})
        )
    atomic.write_json(folder / STATE_FILE, state)
    for old in [*folder.glob("global-round-*.safetensors"), *folder.glob("server-round-*.safetensors")]:
        if old.name not in (name, state.get("arrays")):
            old.unlink(missing_ok=True)


def load(folder: Path) -> Checkpoint | None:
    """The last complete round's checkpoint, or None if there is none."""
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    arrays = load_file(str(folder / state["adapter"]))
    extra = dict(load_file(str(folder / state["arrays"]))) if state.get("arrays") else {}
    return Checkpoint(
        state["run_id"], int(state["round"]), dict(arrays), state["history"], state.get("strategy", {}), extra
    )
