"""The score's parts beside the text score: the calibration, the releases' weights and the local item head.

score(user, item) = (s·u + o) · v_item  +  w·prior_item  +  c·z(Σ_h r^age(h)·N[h, item])  [+ W·u]  [+ b_item]

- s, o: the calibration. s = 1/temperature, learned in log space; o a learned
  direction in the item-vector space that scores items by their text alone.
  Both depend on no item id, so they are shared with the adapter.
- prior, w: the item popularity released under DP (`common.popularity`),
  fixed, times a learned weight w that is part of the calibration (shared).
- N, c: the item co-occurrence among the most popular items released under DP
  (`common.cooccurrence`), read at the user's most recent history items h
  (weighted r^age, standardised over the catalog: z), times a learned weight
  c, shared like w.
- W·u and b: the optional merchant-local item head (one row per catalog item;
  `local_head="bias"` keeps only b, which suits DP: W has a row of noise per
  item).

Every weight is an nn.Linear fed a constant 1 per user, so Opacus computes its
per-user gradient like any other layer's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from common.model_config import ModelConfig

CALIBRATION_PREFIX = "calibration."  # shared tensors under this prefix are the calibration's, the rest LoRA's
PRIOR_WEIGHT = CALIBRATION_PREFIX + "prior_weight.weight"
NEIGHBOUR_WEIGHT = CALIBRATION_PREFIX + "neighbour_weight.weight"
# A user is scored by the co-occurrence rows of their NEIGHBOUR_HISTORY most recent items,
# weighted NEIGHBOUR_RECENCY per step back.
NEIGHBOUR_HISTORY = 10
NEIGHBOUR_RECENCY = 0.8


class Calibration(nn.Module):
    """The score's scale s = 1/temperature (learned in log space), a text-space offset o, and the releases' weights w and c."""

    def __init__(self, dim: int, temperature: float) -> None:
        super().__init__()
        self.log_scale = nn.Linear(1, 1, bias=False)
        self.offset = nn.Linear(1, dim, bias=False)
        self.prior_weight = nn.Linear(1, 1, bias=False)
        self.neighbour_weight = nn.Linear(1, 1, bias=False)
        nn.init.constant_(self.log_scale.weight, math.log(1.0 / temperature))
        nn.init.zeros_(self.offset.weight)
        # w starts at 1 (log-popularity and cosine/temperature are on comparable scales) and c at
        # 0.25 (the standardised co-occurrence score, the best start on validation). Each is frozen
        # until there is a release to weigh: a parameter without signal only adds noise.
        nn.init.ones_(self.prior_weight.weight)
        self.prior_weight.weight.requires_grad_(False)
        nn.init.constant_(self.neighbour_weight.weight, 0.25)
        self.neighbour_weight.weight.requires_grad_(False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        ones = u.new_ones(u.shape[0], 1)
        return u * torch.exp(self.log_scale(ones)) + self.offset(ones)

    def weigh_prior(self, u: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """w·prior for each user's row (w per user, so Opacus sees its per-user gradient)."""
        return self.prior_weight(u.new_ones(u.shape[0], 1)) * prior

    def weigh_neighbours(self, u: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """c·scores for each user's row (c per user, for Opacus, as in `weigh_prior`)."""
        return self.neighbour_weight(u.new_ones(u.shape[0], 1)) * scores


class ItemHead(nn.Module):
    """The merchant-local head over the catalog: b_item, and W·u unless `weights` is off."""

    def __init__(self, dim: int, n_items: int, *, weights: bool) -> None:
        super().__init__()
        self.weights = nn.Linear(dim, n_items, bias=False) if weights else None
        self.bias = nn.Linear(1, n_items, bias=False)  # fed a constant 1: a per-item bias Opacus can clip
        for layer in (self.weights, self.bias):
            if layer is not None:
                nn.init.zeros_(layer.weight)  # start from the text score alone

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        out = self.bias(u.new_ones(u.shape[0], 1))
        return out if self.weights is None else out + self.weights(u)


def neighbour_scores(
    recent: torch.Tensor, slot: torch.Tensor, items: torch.Tensor, matrix: torch.Tensor, n_items: int
) -> torch.Tensor:
    """z(Σ_h r^age(h)·N[h, ·]) over the catalog for each row of `recent` (catalog indices, newest first, -1: none).

    `items` are the catalog indices the released `matrix` covers and `slot`
    maps a catalog index to its row (-1: not covered). Without a release, 0.
    """
    if len(items) == 0:
        return torch.zeros(recent.shape[0], n_items, device=recent.device)
    slots = torch.where(recent >= 0, slot[recent.clamp(min=0)], -1)
    weights = NEIGHBOUR_RECENCY ** torch.arange(recent.shape[1], device=recent.device, dtype=torch.float32)
    weights = torch.where(slots >= 0, weights, torch.zeros_like(weights))
    among = torch.einsum("bh,bhm->bm", weights, matrix[slots.clamp(min=0)])
    scores = torch.zeros(recent.shape[0], n_items, device=recent.device)
    scores[:, items] = among
    spread = scores.std(1, keepdim=True)
    return torch.where(
        spread > 0, (scores - scores.mean(1, keepdim=True)) / spread.clamp(min=1e-12), torch.zeros_like(scores)
    )


def trained_names(
    shared: Sequence[str], cfg: ModelConfig, *, prior: bool, neighbours: bool, adapter: bool = True
) -> list[str]:
    """Which of the `shared` tensors a model trains (sorted): FFA-LoRA freezes A, a release's weight waits for the
    release, and the adapter trains only with a learning rate (`adapter`).

    What `Recommender.shared_parameters` holds, known to a coordinator that never builds the model.
    """
    frozen = {PRIOR_WEIGHT} if not prior else set()
    frozen |= {NEIGHBOUR_WEIGHT} if not neighbours else set()
    lora = [n for n in shared if not n.startswith(CALIBRATION_PREFIX)]
    frozen |= set(lora) if not adapter else {n for n in lora if cfg.ffa and "lora_A" in n}
    return sorted(n for n in shared if n not in frozen)


def calibration_state(calibration: Calibration) -> dict[str, torch.Tensor]:
    return {CALIBRATION_PREFIX + k: v.detach().cpu().clone() for k, v in calibration.state_dict().items()}


def initial_calibration(dim: int, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The calibration a fresh model starts from (what a coordinator sends in round 1)."""
    return calibration_state(Calibration(dim, cfg.temperature))
