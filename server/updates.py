"""Screening and aggregating merchants' adapter updates (new − global LoRA tensors).

Every update is checked before it can touch the global adapter: exactly the
expected tensor names, shapes and dtypes, only finite values, and an L2 norm
under the run's bound. A rejected update is reported with its reason and
left out. Aggregation is users-weighted FedAvg by default, with
coordinate-wise median and trimmed mean as robust options.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from common.arrays import l2_norm
from common.errors import SilorecError

Update = Mapping[str, np.ndarray]
Aggregation = Literal["fedavg", "median", "trimmed-mean"]
AGGREGATIONS: tuple[str, ...] = ("fedavg", "median", "trimmed-mean")


class UpdateRejected(SilorecError):
    """An update failed screening; the message says why."""


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str


def spec_of(arrays: Update) -> dict[str, TensorSpec]:
    """What every update must look like: the names, shapes and dtypes of `arrays`."""
    return {name: TensorSpec(tuple(a.shape), str(a.dtype)) for name, a in arrays.items()}


def screen(update: Update, spec: Mapping[str, TensorSpec], max_norm: float) -> float:
    """Raise UpdateRejected unless `update` matches `spec`, is finite and has norm ≤ `max_norm`; return its norm."""
    missing = sorted(set(spec) - set(update))
    if missing:
        raise UpdateRejected(
            f"missing tensor {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    extra = sorted(set(update) - set(spec))
    if extra:
        raise UpdateRejected(f"unexpected tensor {extra[0]}" + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""))
    for name, want in spec.items():
        a = update[name]
        if tuple(a.shape) != want.shape:
            raise UpdateRejected(f"tensor {name} has shape {tuple(a.shape)}, expected {want.shape}")
        if str(a.dtype) != want.dtype:
            raise UpdateRejected(f"tensor {name} has dtype {a.dtype}, expected {want.dtype}")
        if not np.isfinite(a).all():
            raise UpdateRejected(f"tensor {name} has non-finite values")
    norm = l2_norm(update)
    if norm > max_norm:
        raise UpdateRejected(f"L2 norm {norm:.4g} exceeds the bound {max_norm:g}")
    return norm


def aggregate(
    updates: Sequence[Update], weights: Sequence[float], method: Aggregation = "fedavg", *, trim: float = 0.1
) -> dict[str, np.ndarray]:
    """Combine screened updates tensor by tensor.

    fedavg: weighted mean (weights = users). median: coordinate-wise median.
    trimmed-mean: per coordinate, drop the `trim` fraction of values at each end, average the rest.
    """
    if not updates:
        raise ValueError("nothing to aggregate")
    w = np.asarray(weights, dtype=np.float64)
    if method == "fedavg" and ((w < 0).any() or w.sum() <= 0):
        raise ValueError("weights must be non-negative with a positive sum")
    out = {}
    for name in updates[0]:
        stack = np.stack([np.asarray(u[name], dtype=np.float64) for u in updates])
        if method == "fedavg":
            agg = np.tensordot(w / w.sum(), stack, axes=1)
        elif method == "median":
            agg = np.median(stack, axis=0)
        elif method == "trimmed-mean":
            k = int(np.floor(trim * len(updates)))
            if 2 * k >= len(updates):
                raise ValueError(f"trim {trim} leaves nothing of {len(updates)} updates")
            ordered = np.sort(stack, axis=0)
            agg = ordered[k : len(updates) - k].mean(axis=0)
        else:
            raise ValueError(f"unknown aggregation {method!r}; choose one of {', '.join(AGGREGATIONS)}")
        out[name] = agg.astype(updates[0][name].dtype)
    return out
