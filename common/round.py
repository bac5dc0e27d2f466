"""What the coordinator tells merchants each round: declared once, sent as a Flower ConfigRecord.

The run config (`[tool.flwr.app.config]` in pyproject.toml, overridable with
`flwr run --run-config` or `silorec-sim run` options) is read by the
ServerApp alone; everything a ClientApp needs for a round travels in its
message, so the same ClientApp works under `flwr run`, the simulation engine
and a real deployment.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from flwr.app import ConfigRecord

from common.model_config import ModelConfig
from common.modes import PRIVACY_MODES
from common.presets import CENTRAL_DP, DP_MODEL, SILO
from common.train import TrainConfig


@dataclass(frozen=True)
class RoundConfig:
    """One round's settings. The defaults are federation mode's: central DP-SGD's (common.presets.CENTRAL_DP), one
    step a round, with its two releases; silo mode takes common.presets.SILO over them."""

    run_id: str = "run"
    round: int = 1
    rounds: int = 1
    local_epochs: int = 1  # silo mode: passes over its users per merchant per round
    # expected users per DP-SGD step: over all merchants (federation), per merchant (silo)
    batch_size: int = CENTRAL_DP["batch_size"]
    lr: float = CENTRAL_DP["lr"]
    head_lr: float = CENTRAL_DP["head_lr"]
    max_grad_norm: float = TrainConfig.max_grad_norm
    next_items: int = TrainConfig.next_items
    cut: str = TrainConfig.cut  # where a user's training record cuts their history (common.records)
    epsilon: float = 8.0  # user-level ε over the run: the federation's, or each merchant's budget in silo mode
    no_dp: bool = False  # train without differential privacy: the one switch that turns it off
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
    # the DP preset: the default run is private
    max_tokens: int = DP_MODEL["max_tokens"]
    recency: float = ModelConfig.recency
    temperature: float = ModelConfig.temperature
    local_head: str = DP_MODEL["local_head"]
    # noise multiplier of the popularity prior's one release under DP (common.popularity): of the
    # federation's in federation mode, of each silo's in silo mode; paid from the same ε budget.
    # 0: no prior. A non-private run has none.
    prior_noise: float = 2.0
    # noise multiplier of the one release of item co-occurrence (common.cooccurrence), after the
    # prior and from the same budget; 0: none.
    cooccurrence_noise: float = 1.0
    privacy: str = (
        "federation"  # federation: noise added once for all merchants, through SecAgg+; silo: each merchant's own
    )

    def __post_init__(self) -> None:
        if self.privacy not in PRIVACY_MODES:
            raise ValueError(f"privacy must be one of {', '.join(PRIVACY_MODES)}, not {self.privacy!r}")
        if not self.no_dp and not (
            isinstance(self.epsilon, (int, float)) and math.isfinite(self.epsilon) and self.epsilon > 0
        ):
            raise ValueError(
                f"epsilon must be a finite number > 0, not {self.epsilon!r}; set no-dp = true to train without DP"
            )

    @classmethod
    def for_mode(cls, privacy: str, **overrides: Any) -> RoundConfig:
        """A RoundConfig for `privacy` (silo mode: SILO where `overrides` say nothing)."""
        names = {f.name for f in fields(cls)}
        preset = {k: v for k, v in preset_of(privacy).items() if k in names}
        return cls(**preset | {"privacy": privacy} | overrides)

    @property
    def private(self) -> bool:
        return not self.no_dp

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
    return dict(SILO) if privacy == "silo" else {}
