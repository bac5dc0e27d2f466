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

from common.model_config import MODEL_SETTINGS, ModelConfig
from common.modes import PRIVACY_MODES
from common.presets import CENTRAL_DP, DP_MODEL, SILO
from common.setting import help_of, setting
from common.train import TrainConfig


def _model_setting(name: str):
    """A model setting as the round carries it: ModelConfig's default (under the DP preset) and help."""
    value = DP_MODEL.get(name, getattr(ModelConfig, name))
    return setting(",".join(value) if name == "lora_targets" else value, help_of(ModelConfig, name))


@dataclass(frozen=True)
class RoundConfig:
    """One round's settings. The defaults are federation mode's: central DP-SGD's (common.presets.CENTRAL_DP), one
    step a round, with its two releases; silo mode takes common.presets.SILO over them."""

    run_id: str = setting("run", "The run's id (the coordinator sets it).")
    round: int = setting(1, "This round (the coordinator sets it).")
    rounds: int = setting(1, "The run's planned rounds (the coordinator sets it).")
    local_epochs: int = setting(1, "Silo mode: passes over its users per merchant per round.")
    batch_size: int = setting(
        CENTRAL_DP["batch_size"],
        "Expected users per DP-SGD step: over every merchant in federation mode, per merchant in silo mode.",
    )
    lr: float = setting(CENTRAL_DP["lr"], "LoRA learning rate.")
    head_lr: float = setting(
        CENTRAL_DP["head_lr"],
        "Learning rate of the shared calibration (temperature, text offset, release weights) and of a local item "
        "head where one is trained.",
    )
    max_grad_norm: float = setting(TrainConfig.max_grad_norm, help_of(TrainConfig, "max_grad_norm"))
    next_items: int = setting(TrainConfig.next_items, help_of(TrainConfig, "next_items"))
    cut: str = setting(TrainConfig.cut, help_of(TrainConfig, "cut"))
    epsilon: float = setting(
        8.0,
        "User-level ε over the whole run, a finite number > 0 (federation mode: of the federation and in every "
        "merchant's ledger; silo mode: each merchant's budget).",
    )
    no_dp: bool = setting(
        False,
        "Train without differential privacy (a non-private baseline; says so at the start and in every output): the "
        "one switch that turns DP off.",
    )
    delta: float = setting(
        0.0, "DP δ, below 1/users (0 or unset: 1/(10·users) of the federation, or of each merchant in silo mode)."
    )
    seed: int = setting(0, "Seed of the adapter's init and the training records' cuts.")
    split: str = setting("valid", "Which targets an evaluate message scores: valid or test.")
    cutoff: str = setting(
        "",
        "Time split: test each user's first event after this date (e.g. 1998-03-01, UTC); '' splits leave-one-out.",
    )
    train_until: str = setting("", "Time split: train only on events up to this date ('' is the cutoff).")
    score_scales: str = setting("", "Evaluate: also score with the prior's weight scaled by each of these.")
    silos_dir: str = setting("", "Simulation only: partition-id picks a silo folder under it.")
    threads: int = setting(0, "Torch threads per ClientApp; 0 keeps torch's default.")
    # the model's settings (common.model_config), flat as a ConfigRecord needs them, under the DP preset
    base_model: str = _model_setting("base_model")
    lora_r: int = _model_setting("lora_r")
    lora_alpha: int = _model_setting("lora_alpha")
    lora_targets: str = _model_setting("lora_targets")
    ffa: bool = _model_setting("ffa")
    max_tokens: int = _model_setting("max_tokens")
    recency: float = _model_setting("recency")
    temperature: float = _model_setting("temperature")
    local_head: str = _model_setting("local_head")
    prior_noise: float = setting(
        2.0,
        "Noise multiplier of the item-popularity release, paid from the ε budget: one release over all merchants in "
        "federation mode (exact counts without DP), one per merchant in silo mode (DP runs only); 0: none.",
    )
    cooccurrence_noise: float = setting(
        1.0,
        "Noise multiplier of the item co-occurrence release after the popularity, paid from the same budget "
        "(exact without DP in federation mode, DP runs only in silo mode); 0: none.",
    )
    privacy: str = setting(
        "federation",
        "federation: each round is one DP-SGD step over every merchant's users, the noise added once and split "
        "between merchants, summed through SecAgg+ (ε against the coordinator and any merchants that leave "
        "min-replies honest ones); silo: every merchant adds the full noise for its own users and trains alone, and "
        "the coordinator averages their updates (ε against everyone).",
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
        values = {name: getattr(self, name) for name in MODEL_SETTINGS}
        values["lora_targets"] = tuple(t for t in self.lora_targets.split(",") if t)
        return ModelConfig(**values, seed=self.seed)

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
