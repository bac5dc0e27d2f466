"""Scoring histories with a trained recommender: for evaluation and for a merchant's top-k."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from common.metrics import ScoreFn, target_ranks
from common.recommender import Recommender, build_recommender
from common.score import PRIOR_WEIGHT
from common.silo import Silo
from common.split import EvalCase
from common.storage import load_model_config
from common.text import item_texts


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


# --- the weight of the popularity prior, chosen on validation users -----------------------
#
# Training learns the prior's weight w by next-items cross-entropy from cut points anywhere in a
# user's history, but a user is tested on what came last, when popularity has moved on, so the
# learned weight can be off by a factor. It is scaled by the factor, of a few, that scores best
# on validation users: one scalar, chosen like an early-stopping epoch, never on test users.

PRIOR_SCALES = "1,0.5,0.25,0.75,1.5"  # the factors tried by default; 1 first, so a tie keeps the learned weight


def parse_scales(text: str) -> tuple[float, ...]:
    """ "1,0.5" → (1.0, 0.5); "" → () (keep the learned weight). ValueError on anything else."""
    try:
        scales = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"prior scales must be comma-separated numbers, not {text!r}") from None
    if any(not np.isfinite(k) or k < 0 for k in scales):
        raise ValueError(f"prior scales must be finite and ≥ 0, not {text!r}")
    return scales


@torch.no_grad()
def prior_scale_ranks(
    model: Recommender, cases: Sequence[EvalCase], scales: Sequence[float], *, batch_size: int = 256
) -> dict[float, np.ndarray]:
    """Each case's target rank with the prior's weight scaled by each of `scales` (one pass of the user tower)."""
    scales = tuple(dict.fromkeys(scales))  # each factor once, in the order given
    shift = float(model.calibration.prior_weight.weight) * model.prior.float().cpu()
    ranks: dict[float, list[torch.Tensor]] = {k: [] for k in scales}
    for start in range(0, len(cases), batch_size):
        batch = list(cases[start : start + batch_size])
        scores = score_histories(model, [c.history for c in batch])
        for k in scales:
            ranks[k].append(target_ranks(scores + (k - 1.0) * shift, batch).cpu())
    return {k: torch.cat(r).numpy() if r else np.zeros(0, dtype=np.int64) for k, r in ranks.items()}


def scaled_key(scale: float) -> str:
    """The evaluate metric that holds NDCG@10 with the prior's weight scaled by `scale`."""
    return f"ndcg@10 prior×{scale:g}"


def best_scale(ndcg: Mapping[float, float]) -> float:
    """The factor with the highest validation NDCG@10; the first listed among equals."""
    return max(ndcg, key=lambda k: ndcg[k])


def scale_prior_weight(arrays: Mapping[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """The shared arrays with the prior's weight multiplied by `scale`."""
    weight = np.asarray(arrays[PRIOR_WEIGHT])
    return {**arrays, PRIOR_WEIGHT: (weight * scale).astype(weight.dtype)}


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
    return build_recommender(
        cfg, list(silo.items["item_id"]), item_texts(silo.items), cache_dir=cache_dir, adapter_dir=adapter_dir
    )
