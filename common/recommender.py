"""The text two-tower recommender: a frozen BERT item tower and a BERT+LoRA user tower, scored with the parts
of `common.score`, and which of its state is shared and which stays with its owner.

Only the LoRA tensors and the calibration leave a silo; the per-item head, the
prior and the co-occurrence never do. Everything is trained in one DP-SGD step,
so one accountant covers it (the two releases are in the accountant too). The
item vectors, the prior and the co-occurrence are constants during training
and every layer sees each user's record alone, so each record's gradient
depends on that record alone, which is what per-user clipping needs.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers import PreTrainedTokenizerBase

from common import storage
from common.encoder import attach_adapter, cached_item_vectors, default_device, item_tokens, load_encoder
from common.history import pack_histories, pool_segments, segment_mask
from common.model_config import ModelConfig
from common.score import (
    CALIBRATION_PREFIX,
    NEIGHBOUR_HISTORY,
    Calibration,
    ItemHead,
    calibration_state,
    neighbour_scores,
)


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
        """The encoder's input for each history, on the model's device (`common.history.pack_histories`)."""
        tok = self.tokenizer
        packed = pack_histories(
            histories,
            self.item_tokens,
            budget=self.cfg.max_tokens,
            empty=[tok.cls_token_id, tok.sep_token_id],
            pad=tok.pad_token_id or 0,
            recent=NEIGHBOUR_HISTORY,
        )
        return {k: v.to(self.device) for k, v in packed.items()}

    def encode_users(self, input_ids: torch.Tensor, segments: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """u: each item segment encoded on its own, then pooled by recency (`common.history`)."""
        mask = segment_mask(segments, additive=self._additive_mask)
        hidden = self.user_tower(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
        return pool_segments(hidden, segments, self.cfg.recency)

    def neighbour_scores(self, recent: torch.Tensor) -> torch.Tensor:
        """The released co-occurrence's standardised score over the catalog (`common.score.neighbour_scores`)."""
        return neighbour_scores(recent, self.neighbour_slot, self.neighbour_items, self.neighbours, len(self.item_ids))

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

    # --- what stays: the releases and the local item head ----------------------

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

    def unreleased_prior(self, released: torch.Tensor | None = None) -> float:
        """The prior of an item the popularity release did not cover (a product added since): the median of the
        `released` priors (default: the whole catalog's), or 0 without a release.

        0, log(1 + 0), would rank it below every item anyone bought, which is
        what nobody knows of a new product; the median says "as popular as a
        typical item" and leaves the rest to its text.
        """
        values = self.prior if released is None else released
        return float(values.median()) if len(values) and bool(values.any()) else 0.0

    def _train_weights_of_releases(self) -> None:
        """A release's weight trains only once there is a release to weigh."""
        self.calibration.prior_weight.weight.requires_grad_(self.has_prior)
        self.calibration.neighbour_weight.weight.requires_grad_(self.has_neighbours)

    def local_state(self) -> dict[str, torch.Tensor]:
        """What stays local, detached, on CPU: "prior" (catalog order), "neighbour_items" and "neighbours", "bias" and "weight", each if set."""
        state = {"prior": self.prior} if self.has_prior else {}
        if self.has_neighbours:
            state |= {"neighbour_items": self.neighbour_items, "neighbours": self.neighbours}
        if self.head is not None:
            state["bias"] = self.head.bias.weight.detach().reshape(-1)
            if self.head.weights is not None:
                state["weight"] = self.head.weights.weight.detach()
        return {k: v.cpu().clone() for k, v in state.items()}

    def load_local_state(self, state: dict[str, torch.Tensor], item_ids: list[str]) -> None:
        """Load local state saved for `item_ids`, aligned to this catalog: unknown items start at zero, but for the
        prior, which gives them `unreleased_prior`."""
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
            if "prior" in state and mine and len(mine) < len(self.item_ids):  # items the release did not cover
                unknown = torch.ones(len(self.item_ids), dtype=torch.bool)
                unknown[torch.as_tensor(mine)] = False
                self.prior[unknown.to(self.device)] = self.unreleased_prior(self.prior[torch.as_tensor(mine)])
            # the co-occurrence keeps the saved items that are still in this catalog, by the same alignment
            ours = dict(zip(theirs, mine))  # saved index → index in this catalog
            saved = [int(i) for i in state.get("neighbour_items", torch.zeros(0)).tolist()]
            kept = [k for k, i in enumerate(saved) if i in ours]
            rows = torch.as_tensor(kept, dtype=torch.long)
            matrix = state["neighbours"][rows][:, rows] if kept else torch.zeros(0, 0)
            self.set_neighbours([ours[saved[k]] for k in kept], matrix)  # also sets what trains

    def save_local(self, path: Path) -> None:
        """Write `local_state` with the item ids it aligns to (`common.storage.save_local`)."""
        storage.save_local(path, self.local_state(), self.item_ids)

    def restore_local(self, folder: Path) -> None:
        """Load the local state saved in `folder`, aligned to this catalog by item id; none there, no change."""
        path = storage.local_file(folder)
        if path is not None:
            self.load_local_state(*storage.load_local(path))

    # --- the item tower on new text: search queries and new products ----------

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], *, cache_dir: Path | None = None) -> torch.Tensor:
        """The item tower's vectors of `texts` (n × dim, on the model's device): the frozen encoder, adapter off."""
        with self.user_tower.disable_adapter():
            vectors = cached_item_vectors(
                self.user_tower, self.tokenizer, list(texts), self.cfg, device=self.device, cache_dir=cache_dir
            )
        return vectors.to(self.device)

    @torch.no_grad()
    def add_items(self, item_ids: Sequence[str], texts: Sequence[str], vectors: torch.Tensor | None = None) -> None:
        """Append new catalog items, scorable at once: `vectors` are the item tower's on `texts` (computed if not given).

        A new item is not in the popularity release: it gets the median prior
        of the items that are (`unreleased_prior`), no co-occurrence row and a
        zero head, so its text decides how it ranks against a typical item.
        """
        new = list(item_ids)
        clash = set(new) & set(self.item_ids)
        if clash or len(set(new)) != len(new):
            raise ValueError(f"item ids already in the catalog or given twice: {sorted(clash)[:3] or new}")
        if len(texts) != len(new):
            raise ValueError(f"{len(new)} new items need {len(new)} texts, not {len(texts)}")
        vectors = self.encode_texts(texts) if vectors is None else vectors
        if vectors.shape != (len(new), self.item_vectors.shape[1]):
            raise ValueError(f"{len(new)} new items need {len(new)}×{self.item_vectors.shape[1]} vectors")
        if not new:
            return
        self.item_ids += new
        self.item_tokens += item_tokens(self.tokenizer, list(texts), self.cfg.item_max_tokens)
        self.item_vectors = torch.cat([self.item_vectors, vectors.to(self.device).float()])
        self.prior = torch.cat([self.prior, self.prior.new_full((len(new),), self.unreleased_prior())])
        self.neighbour_slot = torch.cat([self.neighbour_slot, self.neighbour_slot.new_full((len(new),), -1)])
        if self.head is not None:
            for layer in (self.head.bias, self.head.weights):
                if layer is not None:
                    grown = nn.Linear(layer.in_features, layer.out_features + len(new), bias=False).to(self.device)
                    grown.weight.zero_()
                    grown.weight[: layer.out_features] = layer.weight
                    grown.weight.requires_grad_(layer.weight.requires_grad)
                    layer.weight = grown.weight
                    layer.out_features += len(new)

    @torch.no_grad()
    def update_items(self, indices: Sequence[int], texts: Sequence[str], vectors: torch.Tensor) -> None:
        """Give the catalog items at `indices` new texts (a product's description was edited): their vectors and
        the tokens the user tower reads. What was learned or released for them stays."""
        if not (len(indices) == len(texts) == len(vectors)):
            raise ValueError(
                f"{len(indices)} items need as many texts and vectors, not {len(texts)} and {len(vectors)}"
            )
        tokens = item_tokens(self.tokenizer, list(texts), self.cfg.item_max_tokens)
        for row, (i, t) in enumerate(zip(indices, tokens)):
            self.item_tokens[i] = t
            self.item_vectors[i] = vectors[row].to(self.device).float()

    # --- saving -----------------------------------------------------------------

    def save(self, folder: Path) -> None:
        """Save the adapter in peft's format, the model config, the calibration and the local state."""
        storage.save_shared(folder, self.user_tower, self.cfg, calibration_state(self.calibration))
        self.save_local(Path(folder) / storage.LOCAL_FILE)


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
    tokens = item_tokens(tokenizer, list(item_texts), cfg.item_max_tokens)  # read by both towers alike
    tower = attach_adapter(encoder, cfg)
    model = Recommender(tower, tokenizer, vectors, cfg, item_ids, tokens).to(device)
    if adapter_dir is not None:
        model.load_shared_state(storage.read_adapter(adapter_dir, cfg, model.shared_state()))
        model.restore_local(Path(adapter_dir))
    return model
