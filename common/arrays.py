"""Adapter tensors in and out of Flower's ArrayRecord, as float32 numpy arrays keyed by peft name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord
from safetensors.numpy import load as load_bytes
from safetensors.numpy import save as save_bytes

if TYPE_CHECKING:
    import torch


def to_numpy(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().float().numpy() for k, v in state.items()}


def to_torch(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    import torch  # here, not at the top: a ClientApp that moves no tensors need not import it

    return {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in arrays.items()}


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record.keys()}


def nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Payload size of the tensors themselves (what an update costs on the wire, before framing)."""
    return int(sum(a.nbytes for a in arrays.values()))


def l2_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of all tensors together, summed in float64."""
    return float(np.sqrt(sum(float(np.square(a, dtype=np.float64).sum()) for a in arrays.values())))


def pack(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Tensors as safetensors bytes: a format with no code in it, safe to read from a stranger."""
    return save_bytes({k: np.ascontiguousarray(v) for k, v in arrays.items()})


def unpack(data: bytes) -> dict[str, np.ndarray]:
    """Inverse of `pack`; malformed bytes raise ValueError."""
    try:
        return dict(load_bytes(bytes(data)))
    except Exception as e:  # safetensors raises its own error type for every kind of malformed input
        raise ValueError(f"not a safetensors payload: {e}") from None
