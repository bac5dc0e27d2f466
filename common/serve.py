"""Scoring histories with a trained recommender: for evaluation and for a merchant's top-k."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from common.metrics import ScoreFn
from common.silo import Silo
from common.split import EvalCase
from common.text import item_texts
from common.towers import Recommender, build_recommender, load_model_config


@torch.no_grad()
def score_histories(model: Recommender, histories: Sequence[np.ndarray]) -> torch.Tensor:
    """Scores over the whole catalog (users × items, float32 on CPU) for each history."""
    was_training = model.training
    model.eval()
    inputs = model.history_inputs(histories)
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.device.type == "cuda"):
        scores = model(**inputs)
    model.train(was_training)
    return scores.float().cpu()


def scorer(model: Recommender) -> ScoreFn:
    """A ScoreFn for `common.metrics.evaluate`."""

    def score(batch: list[EvalCase]) -> torch.Tensor:
        return score_histories(model, [c.history for c in batch])

    return score


def top_k(scores: torch.Tensor, exclude: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k best (item index, score) pairs of one score row, never an excluded item."""
    scores = scores.clone().float()
    if len(exclude):
        scores[torch.as_tensor(exclude)] = float("-inf")
    k = min(k, int(torch.isfinite(scores).sum()))
    values, idx = torch.topk(scores, k)
    return [(int(i), float(v)) for i, v in zip(idx, values)]


def load_for_silo(adapter_dir: Path, silo: Silo, *, cache_dir: Path | None = None) -> Recommender:
    """The recommender saved in `adapter_dir`, set up over `silo`'s catalog."""
    cfg = load_model_config(adapter_dir)
    return build_recommender(cfg, list(silo.items["item_id"]), item_texts(silo.items), cache_dir=cache_dir, adapter_dir=adapter_dir)
