"""A merchant node's configuration, parsed once from Flower's node config (set by `silorec-client start`).

  data-path    the silo folder (in simulation: partition-id picks one under the run's silos)
  state-path   where the ledger, sealing key and released statistics live (default: <data-path>/.silorec-state)
  cache-path   cache of item vectors (default: <state-path>/cache; in simulation one shared by all silos)
  budget       this merchant's ε budget (default: the run's epsilon); with one, the node takes part only in DP rounds
  no-dp        "true": the node may take part in a run without DP (what `silorec-client start --no-dp` sets)
  signing-key  the merchant's enrolled Ed25519 key (NAME.sign.key); what it seals is then signed

Without `budget` or `no-dp` (a simulation, where the researcher sets both
sides) a node follows the run's ε, 0 included.

Light on purpose: in a deployment every message starts a fresh ClientApp
process, and the messages of SecAgg+'s setup, key-sharing and unmasking
stages need no model at all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common.errors import SilorecError
from common.paths import STATE_DIR


class NodeConfigError(SilorecError):
    """A node config value that silorec cannot use."""


@dataclass(frozen=True)
class NodeConfig:
    data_path: Path | None = None
    state_path: Path | None = None
    cache_path: Path | None = None
    budget: float | None = None
    signing_key: Path | None = None
    no_dp: bool = False
    partition_id: int | None = None  # simulation only

    @classmethod
    def parse(cls, node_config: Mapping) -> NodeConfig:
        """The node config's silorec keys, checked; NodeConfigError names a bad one."""

        def path(key: str) -> Path | None:
            value = node_config.get(key)
            return Path(str(value)) if value not in (None, "") else None

        budget = node_config.get("budget")
        if budget not in (None, ""):
            try:
                budget = float(budget)
            except (TypeError, ValueError):
                raise NodeConfigError(f"node config budget {budget!r} is not a number") from None
            if not (math.isfinite(budget) and budget > 0):
                raise NodeConfigError(f"node config budget {budget!r} must be a finite ε > 0")
        partition = node_config.get("partition-id")
        no_dp = str(node_config.get("no-dp", "")).lower() in ("true", "1", "yes")
        if no_dp and budget not in (None, ""):
            raise NodeConfigError(
                "node config sets both budget and no-dp: a node either has a budget or takes part without DP"
            )
        return cls(
            data_path=path("data-path"),
            state_path=path("state-path"),
            cache_path=path("cache-path"),
            budget=budget if budget not in (None, "") else None,
            signing_key=path("signing-key"),
            no_dp=no_dp,
            partition_id=int(partition) if partition is not None else None,
        )

    def check_privacy(self, private: bool, what: str) -> None:
        """NodeConfigError if a node with a budget is asked to take part in something without DP."""
        if not private and self.budget is not None:
            raise NodeConfigError(
                f"{what} without differential privacy: this node has an ε budget ({self.budget:g}) and "
                "takes part only in DP rounds (start it with --no-dp to join a non-private run)"
            )

    def silo(self, silos_dir: str = "") -> Path:
        """The node's silo: data-path, or in simulation the partition-id-th folder of the run's silos."""
        if self.data_path is not None:
            return self.data_path
        if silos_dir and self.partition_id is not None:
            silos = sorted(p for p in Path(silos_dir).iterdir() if p.is_dir() and not p.name.startswith("."))
            return silos[self.partition_id % len(silos)]
        raise NodeConfigError("node config has no data-path (and this is not a simulation with silos-dir)")

    def state(self, silos_dir: str = "") -> Path:
        """Where the node keeps its ledger, key and released statistics."""
        return self.state_path or self.silo(silos_dir) / STATE_DIR

    def cache(self, silos_dir: str = "") -> Path:
        """The item-vector cache: cache-path, one shared by a simulation's silos, or the state folder's."""
        return self.cache_path or (Path(silos_dir).parent / "cache" if silos_dir else self.state(silos_dir) / "cache")
