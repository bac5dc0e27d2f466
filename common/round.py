"""What the coordinator tells merchants each round: declared once, sent as a Flower ConfigRecord.

The run config (`[tool.flwr.app.config]` in pyproject.toml, overridable with
`flwr run --run-config` or `silorec-sim run` options) is read by the
ServerApp alone; everything a ClientApp needs for a round travels in its
message, so the same ClientApp works under `flwr run`, the simulation engine
and a real deployment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from flwr.app import ConfigRecord

from common.distributed_dp import Lattice
from common.modes import PRIVACY_MODES
from common.towers import DP_MODEL_DEFAULTS, ModelConfig
from common.train import TrainConfig

# The defaults below are `federation` mode's: one DP-SGD step per round over every merchant's
# users, with central DP-SGD's settings (common.train.preset) and its two releases. `silo` mode,
# where each merchant trains local epochs under its own noise, runs with these instead where a
# setting is not given (tuned on MovieLens-100k; see docs/results.md).
SILO_PRESET: dict[str, Any] = {
    "rounds": 3, "local_epochs": 2, "batch_size": 64, "head_lr": 0.1, "prior_noise": 1.0, "cooccurrence_noise": 0.0,
}


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


@dataclass(frozen=True)
class RoundConfig:
    run_id: str = "run"
    round: int = 1
    rounds: int = 1
    local_epochs: int = 1  # silo mode: passes over its users per merchant per round
    batch_size: int = 256  # expected users per DP-SGD step: over all merchants (federation), per merchant (silo)
    lr: float = 1e-3  # the DP preset of common.train
    head_lr: float = 0.01
    max_grad_norm: float = TrainConfig.max_grad_norm
    next_items: int = TrainConfig.next_items
    cut: str = TrainConfig.cut  # where a user's training record cuts their history (common.records)
    epsilon: float = 8.0  # the run's per-merchant ε budget; 0 trains without DP
    delta: float = 0.0  # 0: each silo uses 1/(10·users)
    seed: int = 0
    split: str = "valid"  # which targets an evaluate message scores: valid or test
    score_scales: str = ""  # evaluate: also score with the prior's weight scaled by each of these (common.serve)
    silos_dir: str = ""  # simulation only: partition-id picks a silo folder under it
    threads: int = 0  # torch threads per ClientApp; 0 keeps torch's default
    # the model
    base_model: str = ModelConfig.base_model
    lora_r: int = ModelConfig.lora_r
    lora_alpha: int = ModelConfig.lora_alpha
    lora_targets: str = ",".join(ModelConfig.lora_targets)
    ffa: bool = ModelConfig.ffa
    # DP's federated preset: the default run is private
    max_tokens: int = DP_MODEL_DEFAULTS["max_tokens"]
    recency: float = ModelConfig.recency
    temperature: float = ModelConfig.temperature
    local_head: str = DP_MODEL_DEFAULTS["local_head"]
    # noise multiplier of the popularity prior's one release under DP (common.popularity): of the
    # federation's in federation mode, of each silo's in silo mode; paid from the same ε budget.
    # 0: no prior. A non-private run has none.
    prior_noise: float = 2.0
    # noise multiplier of the one release of item co-occurrence (common.cooccurrence), after the
    # prior and from the same budget; 0: none.
    cooccurrence_noise: float = 1.0
    privacy: str = "federation"  # federation: noise added once for all merchants, through SecAgg+; silo: each merchant's own

    def __post_init__(self) -> None:
        if self.privacy not in PRIVACY_MODES:
            raise ValueError(f"privacy must be one of {', '.join(PRIVACY_MODES)}, not {self.privacy!r}")

    @classmethod
    def for_mode(cls, privacy: str, **overrides: Any) -> RoundConfig:
        """A RoundConfig for `privacy` (silo mode: SILO_PRESET where `overrides` say nothing)."""
        names = {f.name for f in fields(cls)}
        preset = {k: v for k, v in preset_of(privacy).items() if k in names}
        return cls(**preset | {"privacy": privacy} | overrides)

    @property
    def private(self) -> bool:
        return self.epsilon > 0

    def model(self) -> ModelConfig:
        return ModelConfig(
            base_model=self.base_model,
            lora_r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_targets=tuple(t for t in self.lora_targets.split(",") if t),
            ffa=self.ffa,
            max_tokens=self.max_tokens,
            recency=self.recency,
            temperature=self.temperature,
            local_head=self.local_head,
            seed=self.seed,
        )

    def train(self, *, noise_multiplier: float | None, delta: float | None) -> TrainConfig:
        return TrainConfig(
            epochs=self.local_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            head_lr=self.head_lr,
            max_grad_norm=self.max_grad_norm,
            next_items=self.next_items,
            cut=self.cut,
            noise_multiplier=noise_multiplier,
            delta=delta,
            seed=self.seed + 1009 * self.round,  # fresh records each round, reproducible
        )

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(asdict(self))

    @classmethod
    def from_record(cls, record: ConfigRecord | dict[str, Any]) -> RoundConfig:
        known = {f.name: f.type for f in fields(cls)}
        return cls(**{k: v for k, v in dict(record).items() if k in known})

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any], **overrides: Any) -> RoundConfig:
        """Take the fields named in a Flower run config (kebab-case keys), then `overrides`."""
        names = {f.name for f in fields(cls)}
        values = {k.replace("-", "_"): v for k, v in run_config.items() if k.replace("-", "_") in names}
        return replace(cls(**values), **overrides)


def preset_of(privacy: str) -> dict[str, Any]:
    """The settings `privacy` mode runs with where none is given, over the defaults (federation mode's)."""
    if privacy not in PRIVACY_MODES:
        raise ValueError(f"privacy must be one of {', '.join(PRIVACY_MODES)}, not {privacy!r}")
    return dict(SILO_PRESET) if privacy == "silo" else {}


SUM_TASKS = ("update", "gradient", "popularity", "cooccurrence")


@dataclass(frozen=True)
class SumSpec:
    """What one SecAgg+ sum asks of each merchant, sent flat in its fit config ("sum-" keys).

    task: `update` (silo mode: users × the merchant's update, weighted FedAvg),
    `gradient` (federation mode: one DP-SGD step's clipped sum plus a noise
    share), `popularity` or `cooccurrence` (federation mode: a release's counts
    over `keys` plus a noise share). `names` are the tensors in send order;
    `clip` is one user's L2 bound (`update`: the bound on the whole update).
    """

    task: str
    names: tuple[str, ...]
    noise_multiplier: float = 0.0
    sample_rate: float = 1.0
    min_replies: int = 1
    clip: float = 1.0
    lattice: Lattice | None = None
    keys: bytes = b""  # popularity: the union of item-text keys; co-occurrence: the top ones (uint64, big-endian)

    def __post_init__(self) -> None:
        if self.task not in SUM_TASKS:
            raise ValueError(f"unknown secure-sum task {self.task!r}")

    def to_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sum-task": self.task, "sum-names": ",".join(self.names), "sum-noise": float(self.noise_multiplier),
            "sum-rate": float(self.sample_rate), "sum-min-replies": int(self.min_replies), "sum-clip": float(self.clip),
            "sum-keys": self.keys,
        }
        if self.lattice is not None:
            out |= {f"sum-lattice-{k}": v for k, v in self.lattice.to_config().items()}
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SumSpec:
        lattice = {k.removeprefix("sum-lattice-"): v for k, v in config.items() if k.startswith("sum-lattice-")}
        return cls(
            task=str(config["sum-task"]), names=tuple(n for n in str(config["sum-names"]).split(",") if n),
            noise_multiplier=float(config["sum-noise"]), sample_rate=float(config["sum-rate"]),
            min_replies=int(config["sum-min-replies"]), clip=float(config["sum-clip"]),
            lattice=Lattice.from_config(lattice) if lattice else None, keys=bytes(config.get("sum-keys", b"")),
        )
