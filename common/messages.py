"""What travels in silorec's messages besides the round's settings: record names, asks, and a secure sum's spec.

Light on purpose (numpy and the lattice only): in a deployment every message
starts a fresh ClientApp process, and most need no model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.distributed_dp import Lattice

# A query message's "ask" (in its POOL_RECORD) before round 1, when the coordinator pools
# popularity: each merchant's released counts keyed by item text (ASK_TABLE, sealed to the
# run's key like an update), then the pooled counts of its own keys (USE_POOLED, sealed to the
# merchant like the global adapter). A query without it asks for the merchant's sealing key.
POOL_RECORD = "pool"
ASK_TABLE = "popularity"
USE_POOLED = "pooled-popularity"
TABLE_KIND = "popularity-table"  # what a sealed table's associated data names it
# In `federation` mode the coordinator first asks each merchant for its census (trainable users and
# item-text keys, sealed like a table), and after the co-occurrence release hands each merchant
# its rows of it (sealed to the merchant).
ASK_CENSUS = "census"
CENSUS_KIND = "census"
USE_NEIGHBOURS = "pooled-cooccurrence"
# The fit-config key of a sealed global adapter in a SecAgg+ round (legacy messages carry no
# arrays by name, and parameters would travel in the clear).
SEALED_GLOBAL_KEY = "sealed-global"


SUM_TASKS = ("update", "gradient", "popularity", "cooccurrence")


@dataclass(frozen=True)
class SumSpec:
    """What one SecAgg+ sum asks of each merchant, sent flat in its fit config ("sum-" keys).

    task: `update` (silo mode: users × the merchant's update, weighted FedAvg),
    `gradient` (federation mode: one DP-SGD step's clipped sum plus a noise
    share), `popularity` or `cooccurrence` (federation mode: a release's counts
    over the item keys sealed beside it, plus a noise share). `names` are the
    tensors in send order; `clip` is one user's L2 bound (`update`: the bound on
    the whole update).
    """

    task: str
    names: tuple[str, ...]
    noise_multiplier: float = 0.0
    sample_rate: float = 1.0
    min_replies: int = 1
    clip: float = 1.0
    lattice: Lattice | None = None

    def __post_init__(self) -> None:
        if self.task not in SUM_TASKS:
            raise ValueError(f"unknown secure-sum task {self.task!r}")

    def to_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sum-task": self.task,
            "sum-names": ",".join(self.names),
            "sum-noise": float(self.noise_multiplier),
            "sum-rate": float(self.sample_rate),
            "sum-min-replies": int(self.min_replies),
            "sum-clip": float(self.clip),
        }
        if self.lattice is not None:
            out |= {f"sum-lattice-{k}": v for k, v in self.lattice.to_config().items()}
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SumSpec:
        lattice = {k.removeprefix("sum-lattice-"): v for k, v in config.items() if k.startswith("sum-lattice-")}
        return cls(
            task=str(config["sum-task"]),
            names=tuple(n for n in str(config["sum-names"]).split(",") if n),
            noise_multiplier=float(config["sum-noise"]),
            sample_rate=float(config["sum-rate"]),
            min_replies=int(config["sum-min-replies"]),
            clip=float(config["sum-clip"]),
            lattice=Lattice.from_config(lattice) if lattice else None,
        )
