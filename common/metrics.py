"""Full-ranking metrics as docs/eval.md defines them, and the MostPop baseline.

rank = 1 + the number of other unmasked candidates scoring at least as high
as the target (ties count against the model). HR@K, NDCG@K and MRR@K are
averaged over evaluated users, for K = 10 and 20.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from common import atomic
from common.errors import SilorecError
from common.split import EvalCase, Split

KS = (10, 20)
ScoreFn = Callable[[list[EvalCase]], torch.Tensor]


def target_ranks(scores: torch.Tensor, cases: Sequence[EvalCase]) -> torch.Tensor:
    """Rank of each case's target in its row of `scores` (users × items), history masked."""
    if not torch.isfinite(scores).all():
        raise ValueError("non-finite scores: the model produced NaN or infinity")
    scores = scores.float()
    rows = torch.arange(len(cases), device=scores.device)
    targets = torch.tensor([c.target for c in cases], device=scores.device)
    target_scores = scores[rows, targets]
    at_least = scores >= target_scores[:, None]
    for r, case in enumerate(cases):
        masked = case.masked_items()
        if len(masked):
            at_least[r, torch.as_tensor(masked, device=scores.device)] = False
    at_least[rows, targets] = False
    return 1 + at_least.sum(1)


def metrics_from_ranks(ranks: np.ndarray | torch.Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    """HR@K, NDCG@K, MRR@K averaged over users, and the number of users."""
    ranks = np.asarray(torch.as_tensor(ranks).cpu(), dtype=np.float64)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks <= k
        out[f"hr@{k}"] = float(hit.mean()) if len(ranks) else 0.0
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 1), 0.0).mean()) if len(ranks) else 0.0
        out[f"mrr@{k}"] = float(np.where(hit, 1.0 / ranks, 0.0).mean()) if len(ranks) else 0.0
    out["users"] = len(ranks)
    return out


def ranks_of(
    score: ScoreFn, cases: Sequence[EvalCase], *, batch_size: int = 256, desc: str | None = None
) -> np.ndarray:
    """Each case's target rank under a scoring function, scoring `batch_size` users at a time."""
    ranks = []
    batches = range(0, len(cases), batch_size)
    for start in tqdm(batches, desc=desc, disable=desc is None, leave=False, unit="batch"):
        batch = list(cases[start : start + batch_size])
        ranks.append(target_ranks(score(batch), batch).cpu())
    return torch.cat(ranks).numpy() if ranks else np.zeros(0, dtype=np.int64)


def evaluate(
    score: ScoreFn, cases: Sequence[EvalCase], *, batch_size: int = 256, desc: str | None = None
) -> dict[str, float]:
    """Metrics of a scoring function over `cases`, scoring `batch_size` users at a time."""
    return metrics_from_ranks(ranks_of(score, cases, batch_size=batch_size, desc=desc))


RANKS_FILE = "ranks.json"  # a run's per-user target ranks, by split: what `silorec-sim compare` pairs runs by


def save_ranks(folder: Path, ranks: Mapping[str, Mapping[str, int]], *, model: str) -> Path:
    """Write `folder`/ranks.json: each evaluated user's target rank by split ({"valid": {user_id: rank}, "test": …})."""
    path = Path(folder) / RANKS_FILE
    atomic.write_json(
        path,
        {"model": model, **{split: {str(u): int(r) for u, r in by_user.items()} for split, by_user in ranks.items()}},
    )
    return path


def load_ranks(folder: Path) -> dict[str, dict[str, int]]:
    """What `save_ranks` wrote in `folder`, by split and user id; SilorecError if there is none."""
    path = Path(folder) / RANKS_FILE
    try:
        data = json.loads(path.read_text())
        return {split: {str(u): int(r) for u, r in data[split].items()} for split in ("valid", "test")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SilorecError(
            f"{path}: no per-user ranks to pair ({e}); finish the run with this version of silorec"
        ) from None


def paired_difference(
    ranks_a: np.ndarray, ranks_b: np.ndarray, *, k: int = 10, samples: int = 5000, level: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """NDCG@k of A minus B on the same users, with a paired bootstrap confidence interval.

    Two models scored on the same test users share much of their per-user
    variation (a user whose next item is hard to guess is hard for both), so
    the difference of their means is less uncertain than two independent
    means would make it; the interval resamples users, keeping each user's
    pair of ranks together.

    Ranks of shape (runs, users), from repeated runs on the same users, give
    the difference of each arm's mean over its runs (the arms may have run
    different numbers of times): each user's differences stay together when
    users are resampled, so the interval is over users, for the mean over
    those runs' draws of the training noise.
    """
    a, b = (np.asarray(r, dtype=np.float64) for r in (ranks_a, ranks_b))
    if a.ndim not in (1, 2) or b.ndim not in (1, 2) or a.shape[-1] != b.shape[-1] or not a.size or not b.size:
        raise ValueError(
            f"paired ranks must be two non-empty (runs ×) users arrays over the same users, not {a.shape} and {b.shape}"
        )

    def gain(r: np.ndarray) -> np.ndarray:  # per user, over runs
        return np.where(r <= k, 1.0 / np.log2(r + 1), 0.0).reshape(-1, r.shape[-1]).mean(axis=0)

    d = gain(a) - gain(b)
    rng = np.random.default_rng(seed)
    means = np.array([d[rng.integers(0, len(d), len(d))].mean() for _ in range(samples)])
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {
        "difference": float(d.mean()),
        "low": float(low),
        "high": float(high),
        "level": level,
        "users": len(d),
        "k": k,
    }


def popularity(split: Split) -> np.ndarray:
    """Interaction counts per item over the training histories."""
    counts = np.zeros(split.n_items, dtype=np.float64)
    for h in split.train:
        np.add.at(counts, h, 1.0)
    return counts


def most_pop(split: Split) -> dict[str, dict[str, float]]:
    """MostPop (training-set popularity) on the split's validation and test cases."""
    score = most_pop_scorer(split)
    return {"valid": evaluate(score, split.valid), "test": evaluate(score, split.test)}


def most_pop_scorer(split: Split) -> ScoreFn:
    """Every user's scores are the items' training-set popularity."""
    pop = torch.as_tensor(popularity(split))

    def score(batch: list[EvalCase]) -> torch.Tensor:
        return pop.expand(len(batch), -1)

    return score
