"""What defines a recommender: the base model, the adapter and the history budget; saved beside every adapter."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from common.setting import setting

BUNDLED = "bundled"
LOCAL_HEADS = ("full", "bias", "none")
LocalHead = Literal["full", "bias", "none"]
# What a user chooses, as options and in the run config (item_max_tokens is fixed; the seed is the run's).
MODEL_SETTINGS = (
    "base_model",
    "lora_r",
    "lora_alpha",
    "lora_targets",
    "ffa",
    "max_tokens",
    "recency",
    "temperature",
    "local_head",
)


@dataclass(frozen=True)
class ModelConfig:
    """What defines a recommender; saved beside the adapter so it can be rebuilt."""

    base_model: str = setting(
        BUNDLED, "BERT-family encoder: 'bundled' (all-MiniLM-L6-v2), a local path or a hub name in the local cache."
    )
    lora_r: int = setting(8, "LoRA rank.")
    lora_alpha: int = setting(16, "LoRA scaling alpha.")
    lora_targets: tuple[str, ...] = setting(("query", "value"), "Comma-separated module names to adapt.")
    ffa: bool = setting(False, "FFA-LoRA: freeze A at its seeded init, train and share only B.")
    max_tokens: int = setting(128, "Token budget of a user's history: the texts of their most recent items.")
    item_max_tokens: int = setting(64, "Token budget of an item's text.")
    recency: float = setting(0.6, "Weight of a history item in the user vector, per step back in time (1: plain mean).")
    temperature: float = setting(0.1, "Initial temperature of the cosine score (the scale is learned).")
    local_head: LocalHead = setting("full", "Merchant-local item head: per-item weights and bias, bias only, or none.")
    seed: int = setting(0, "Seed of the adapter's init (and FFA's frozen A).")

    def __post_init__(self) -> None:
        if self.local_head not in LOCAL_HEADS:
            raise ValueError(f"local_head must be one of {', '.join(LOCAL_HEADS)}, not {self.local_head!r}")
        if not 0.0 < self.recency <= 1.0:
            raise ValueError(f"recency must be in (0, 1], not {self.recency}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ModelConfig:
        data = dict(data)
        data["lora_targets"] = tuple(data.get("lora_targets", cls().lora_targets))
        if isinstance(data.get("local_head"), bool):  # written before the head had modes
            data["local_head"] = "full" if data["local_head"] else "none"
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
