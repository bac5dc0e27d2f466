"""An adapter folder on disk: what is shared (peft's adapter, the calibration, the model config) and what stays
(the local state: released statistics and the item head), each written whole and read back with an error that
names the file at fault. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import save as tensors_to_bytes
from torch import nn

from common import atomic
from common.errors import SilorecError
from common.model_config import ModelConfig
from common.score import CALIBRATION_PREFIX

MODEL_FILE = "silorec_model.json"
CALIBRATION_FILE = "silorec_calibration.safetensors"
ADAPTER_CONFIG = "adapter_config.json"  # peft's
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's
# What stays with its owner (in an adapter folder, or a merchant's state folder): the released
# popularity and co-occurrence, and the item head where one is trained, aligned by item id.
LOCAL_FILE = "silorec_local.safetensors"
LEGACY_LOCAL_FILES = ("silorec_head.safetensors", "head.safetensors")  # its earlier names, still read


class AdapterError(SilorecError):
    """An adapter folder that is not a whole, matching silorec adapter."""


def save_shared(folder: Path, tower: nn.Module, cfg: ModelConfig, calibration: dict[str, torch.Tensor]) -> None:
    """The shared model: the adapter in peft's format, the calibration beside it, and the model config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tower.save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in calibration.items()}, str(folder / CALIBRATION_FILE))
    (folder / MODEL_FILE).write_text(json.dumps(cfg.to_json(), indent=2) + "\n")


def save_local(path: Path, state: Mapping[str, torch.Tensor], item_ids: list[str]) -> None:
    """Write local state with the item ids it aligns to, atomically (several processes may write); nothing if empty."""
    if state:
        tensors = {k: v.contiguous() for k, v in state.items()}
        atomic.write_bytes(Path(path), tensors_to_bytes(tensors, metadata={"item_ids": json.dumps(item_ids)}))


def local_file(folder: Path) -> Path | None:
    """The local state file in `folder` (under its current or an earlier name), or None."""
    for name in (LOCAL_FILE, *LEGACY_LOCAL_FILES):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def load_local(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The local state `save_local` wrote and the item ids it aligns to; AdapterError if it is damaged."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            item_ids = json.loads((f.metadata() or {})["item_ids"])
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a truncated file, or one without its item ids
        raise AdapterError(
            f"{path}: unreadable local state ({type(e).__name__}: {e}); remove it to start over"
        ) from None
    if not isinstance(item_ids, list):
        raise AdapterError(f"{path}: its item ids are not a list; remove it to start over")
    return state, item_ids


def load_model_config(adapter_dir: Path) -> ModelConfig:
    """The ModelConfig saved beside an adapter, with a clear error if it is not a silorec adapter."""
    path = Path(adapter_dir) / MODEL_FILE
    if not path.is_file():
        raise AdapterError(f"{adapter_dir}: no {MODEL_FILE}; is this an adapter folder written by silorec?")
    data = _json(path)
    try:
        return ModelConfig.from_json(data)
    except (TypeError, ValueError, AttributeError) as e:
        raise AdapterError(f"{path}: not a silorec model config ({e}); export the adapter again") from None


def read_adapter(adapter_dir: Path, cfg: ModelConfig, expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The shared tensors saved in `adapter_dir`, checked against peft's config and the `expected` names and shapes.

    Local files only: a missing weights file is an error, never a download.
    """
    folder = Path(adapter_dir)
    config = _json(folder / ADAPTER_CONFIG)
    saved = {
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": sorted(config.get("target_modules") or []),
    }
    want = {"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.lora_targets)}
    for key in want:
        if saved[key] != want[key]:
            raise AdapterError(
                f"{folder / ADAPTER_CONFIG}: {key} is {saved[key]!r} but {MODEL_FILE} says {want[key]!r}; "
                "the two files are of different adapters"
            )
    state = _tensors(folder / ADAPTER_WEIGHTS)
    state = {k.replace(".default.", "."): v for k, v in state.items()}  # peft's names, with or without the adapter's
    if (folder / CALIBRATION_FILE).is_file():
        state |= _tensors(folder / CALIBRATION_FILE)
    for name, tensor in state.items():
        if name not in expected and not (cfg.ffa and "lora_A" in name):
            raise AdapterError(f"{folder}: tensor {name} belongs to no {cfg.lora_r}-rank adapter of {cfg.base_model}")
        if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
            raise AdapterError(
                f"{folder}: tensor {name} has shape {tuple(tensor.shape)}, this model's is "
                f"{tuple(expected[name].shape)} (another rank or base model?)"
            )
    missing = sorted(n for n in expected if n not in state and not n.startswith(CALIBRATION_PREFIX))
    if missing:
        raise AdapterError(
            f"{folder / ADAPTER_WEIGHTS}: lacks tensor {missing[0]}"
            + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return state


def _json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise AdapterError(f"{path} is missing; is this a whole adapter folder written by silorec?") from None
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: unreadable ({e}); export the adapter again") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: not a JSON object; export the adapter again")
    return data


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise AdapterError(
            f"{path} is missing; is this a whole adapter folder written by silorec? (nothing is downloaded)"
        )
    try:
        return dict(load_file(str(path)))
    except Exception as e:  # safetensors raises its own error for a truncated or damaged file
        raise AdapterError(f"{path}: unreadable tensors ({e}); export the adapter again") from None
