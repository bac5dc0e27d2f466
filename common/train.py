"""The one training function: used by the centralised baseline and by every federated client.

Records are users (one per user per pass; see `common.records`); the loss is
cross-entropy over the whole catalog, history items masked. With a privacy
budget or a noise multiplier it runs DP-SGD built from Opacus's parts: Poisson
sampling over users, per-user clipping to `max_grad_norm`, Gaussian noise, and
an accountant whose history a caller can keep across calls (the federated
ledger does). Without one it trains normally.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from opacus.optimizers import DPPerLayerOptimizer
from tqdm.auto import tqdm

from common import accounting
from common.presets import CENTRAL_DP
from common.recommender import Recommender
from common.records import Cut, UserRecord, UserRecords
from common.setting import setting
from common.split import Split

AccountantHistory = list[accounting.Entry]


@dataclass(frozen=True)
class TrainConfig:
    """One training call's settings: the non-private defaults; a DP run takes common.presets.CENTRAL_DP over them."""

    epochs: int = setting(15, "Passes over the users.")
    batch_size: int = setting(64, "Expected users per step (with DP the sample rate is batch-size / users).")
    lr: float = setting(5e-3, "Learning rate of the LoRA adapter.")
    head_lr: float = setting(
        0.02,
        "Learning rate of the calibration and the local item head: small layers that must move far in few steps.",
    )
    weight_decay: float = setting(0.0, "AdamW's weight decay.")
    max_grad_norm: float = setting(1.0, "Per-user clipping bound C of the whole gradient (DP).")
    # How max_grad_norm² is shared between the adapter, the head's per-item weights and the small
    # rest (item bias, calibration) by per-group clipping: the adapter's raw per-user norm is
    # several times the head's, and one global clip would starve the head of signal.
    clip_shares: tuple[float, float, float] = (0.5, 0.25, 0.25)
    epsilon: float | None = setting(None, "Target ε of this call; None and no noise multiplier: no DP.")
    delta: float | None = setting(None, "DP δ, below 1/users (default: 1/(10·users)).")
    noise_multiplier: float | None = None  # set directly (the federated ledger plans it across rounds)
    accountant: str = accounting.DEFAULT
    next_items: int = setting(5, "Targets of a training record: the items that followed the cut.")
    cut: Cut = setting(
        "random",
        "Where a user's training record cuts their history: anywhere (random), within the last items (recent), or at "
        "the last one.",
    )
    seed: int = setting(0, "Seed of the adapter's init, the records and (without DP) the batch order.")
    noise_seed: int | None = setting(
        None,
        "Seed the DP noise and sampling, for a reproducible experiment (default: fresh OS entropy). Whoever knows it "
        "can subtract the noise: never for a model you release.",
    )

    @property
    def private(self) -> bool:
        return self.epsilon is not None or self.noise_multiplier is not None


def preset(private: bool, **overrides) -> TrainConfig:
    """A central run's TrainConfig: the defaults, under DP with `common.presets.CENTRAL_DP` over them, then the
    `overrides` that are not None."""
    base = dict(CENTRAL_DP) if private else {}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**base)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # mean loss per epoch
    steps: int = 0
    epochs: int = 0
    users: int = 0
    sample_rate: float = 0.0
    noise_multiplier: float = 0.0
    epsilon: float | None = None  # over the whole accountant history, this call included
    delta: float | None = None
    accountant_history: AccountantHistory = field(default_factory=list)
    seconds: float = 0.0


EpochCallback = Callable[[int, TrainResult], bool]  # return True to stop early


def default_delta(users: int) -> float:
    """δ well below 1/users, as user-level DP asks."""
    return 1.0 / (10 * max(users, 1))


def plan_noise(
    cfg: TrainConfig, users: int, *, steps: int, history: AccountantHistory | None = None
) -> tuple[float, float, float]:
    """(sample rate, noise multiplier, δ) for `steps` steps over `users` users under `cfg`."""
    sample_rate = min(1.0, cfg.batch_size / max(users, 1))
    delta = cfg.delta if cfg.delta is not None else default_delta(users)
    if cfg.noise_multiplier is not None:
        return sample_rate, cfg.noise_multiplier, delta
    if cfg.epsilon is None:
        return sample_rate, 0.0, delta
    sigma = accounting.noise_for(
        cfg.epsilon, delta, sample_rate=sample_rate, steps=steps, history=history or (), accountant=cfg.accountant
    )
    return sample_rate, sigma, delta


def train(
    model: Recommender,
    split: Split,
    cfg: TrainConfig,
    *,
    history: AccountantHistory | None = None,
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train `model` in place on the split's training histories; return losses and privacy spent."""
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    records = UserRecords(split, seed=cfg.seed, next_items=cfg.next_items, cut=cfg.cut)
    users = len(records)
    result = TrainResult(users=users, accountant_history=[tuple(h) for h in (history or [])])
    if users == 0:
        return result
    steps_per_epoch = max(1, math.ceil(users / cfg.batch_size))
    model.set_adapter_trainable(cfg.lr > 0)  # lr 0: the adapter stays as it is and takes no share of the clipping bound
    sample_rate, sigma, delta = plan_noise(cfg, users, steps=cfg.epochs * steps_per_epoch, history=history)
    result.sample_rate, result.noise_multiplier = sample_rate, sigma
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    total_steps = cfg.epochs * steps_per_epoch
    optimizer, schedule = optimizer_for(
        [p for n, p in trainable if model.kind_of(n) == "adapter"],
        [p for n, p in trainable if model.kind_of(n) != "adapter"],
        cfg,
        total_steps,
    )
    net: torch.nn.Module = model
    accountant = None
    noise_seed = None
    if cfg.private:
        net = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        noise_seed = cfg.noise_seed if cfg.noise_seed is not None else secrets.randbits(63)
        generator = torch.Generator(device=model.device).manual_seed(noise_seed)
        optimizer = dp_optimizer(
            model, optimizer, cfg, sigma, expected_batch_size=max(1, round(sample_rate * users)), generator=generator
        )
        accountant = create_accountant(cfg.accountant)
        accountant.history = list(result.accountant_history)
        result.delta = delta
    # Poisson sampling draws from the noise's seed: privacy amplification assumes the batches are secret.
    rng = np.random.default_rng(noise_seed if cfg.private else cfg.seed)
    model.train()
    try:
        for epoch in range(cfg.epochs):
            records.set_epoch(epoch)
            batches = (
                _poisson_batches(rng, users, sample_rate, steps_per_epoch)
                if cfg.private
                else _shuffled_batches(rng, users, cfg.batch_size)
            )
            losses = []
            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False, disable=not progress)
            for idx in bar:
                if len(idx):
                    loss = _step(net, model, optimizer, [records[i] for i in idx])
                    losses.append(loss)
                    bar.set_postfix(loss=f"{loss:.3f}")
                schedule.step()
                # An empty Poisson draw still counts: the accountant assumed this step happened.
                if accountant is not None:
                    accountant.step(noise_multiplier=sigma, sample_rate=sample_rate)
                result.steps += 1
            result.losses.append(float(np.mean(losses)) if losses else float("nan"))
            result.epochs = epoch + 1
            if accountant is not None:
                result.accountant_history = [tuple(h) for h in accountant.history]
                result.epsilon = accounting.epsilon(result.accountant_history, delta, cfg.accountant)
            if on_epoch is not None and on_epoch(epoch, result):
                break
    finally:
        if isinstance(net, GradSampleModule):
            net._close()  # remove Opacus hooks and grad_sample buffers from the model
    result.seconds = time.perf_counter() - start
    return result


def optimizer_for(
    adapter: Sequence[torch.Tensor], rest: Sequence[torch.Tensor], cfg: TrainConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with the adapter at `lr` and the small rest (calibration, item head) at `head_lr`, and its schedule:
    cosine decay to zero over the planned steps, so that the last ones settle instead of jumping around.

    The same for central training, each merchant training alone, and the
    coordinator's step in `federation` mode.
    """
    groups = ([{"params": list(adapter), "lr": cfg.lr}] if adapter else []) + (
        [{"params": list(rest), "lr": cfg.head_lr}] if rest else []
    )
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    total = max(1, total_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total))
    )
    return optimizer, schedule


def clipped_gradient_sum(model: Recommender, batch: Sequence[UserRecord], cfg: TrainConfig) -> dict[str, np.ndarray]:
    """Σ over `batch` of each user's gradient of the shared parameters, clipped as DP-SGD clips it; no noise.

    One merchant's part of one `federation` step (`common.distributed_dp`
    adds its noise share). Opacus computes and clips the per-user gradients
    (`dp_optimizer`), exactly as in `train`; keys are `shared_state` names.
    """
    shared = model.shared_parameters()
    if not batch:  # an empty Poisson draw still takes part: zeros, plus its noise share
        return {n: np.zeros(tuple(p.shape)) for n, p in shared.items()}
    net = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = dp_optimizer(model, torch.optim.SGD(params, lr=0.0), cfg, 0.0, expected_batch_size=1)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        batch_loss(net, model, batch).backward()
        optimizer.clip_and_accumulate()
        return {n: p.summed_grad.detach().double().cpu().numpy() for n, p in shared.items()}
    finally:
        net._close()


def clip_bounds(model: Recommender, cfg: TrainConfig) -> dict[str, float]:
    """Per-tensor clipping bounds whose squares sum to max_grad_norm², shared out by `cfg.clip_shares`."""
    names = model.trainable_names()
    groups = {kind: [n for n in names if model.kind_of(n) == kind] for kind in ("adapter", "weight", "bias")}
    shares = {g: s for g, s in zip(groups, cfg.clip_shares) if groups[g]}
    total = sum(shares.values())
    bounds = {}
    for group, share in shares.items():
        for name in groups[group]:
            bounds[name] = cfg.max_grad_norm * math.sqrt(share / total / len(groups[group]))
    return bounds


def dp_optimizer(
    model: Recommender,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    noise_multiplier: float,
    *,
    expected_batch_size: int,
    generator: torch.Generator | None = None,
) -> DPPerLayerOptimizer:
    """Opacus's optimizer with per-group clipping: each user's whole gradient stays within max_grad_norm."""
    by_param = {id(p): n for n, p in model.named_parameters()}
    bounds = clip_bounds(model, cfg)
    # the order of Opacus's own `params(optimizer)`: trainable parameters, group by group
    ordered = [bounds[by_param[id(p)]] for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    return DPPerLayerOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=ordered,
        expected_batch_size=expected_batch_size,
        generator=generator,
    )


def _step(
    net: torch.nn.Module,
    model: Recommender,
    optimizer: torch.optim.Optimizer,
    batch: list[UserRecord],
) -> float:
    loss = batch_loss(net, model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def batch_loss(net: torch.nn.Module, model: Recommender, batch: Sequence[UserRecord]) -> torch.Tensor:
    """The mean next-items loss of `batch` through `net` (the model, or Opacus's wrapper of it)."""
    inputs = model.history_inputs([r.history for r in batch])
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.device.type == "cuda"):
        logits = net(**inputs)
    return next_items_loss(mask_history(logits.float(), batch), batch)


def next_items_loss(logits: torch.Tensor, batch: Sequence[UserRecord], *, per_record: bool = False) -> torch.Tensor:
    """Cross-entropy over the catalog, averaged over each record's targets, then over records (or one per record)."""
    k = max(len(r.targets) for r in batch)
    targets = torch.zeros(len(batch), k, dtype=torch.long)
    weights = torch.zeros(len(batch), k)
    for i, r in enumerate(batch):
        targets[i, : len(r.targets)] = torch.as_tensor(r.targets)
        weights[i, : len(r.targets)] = 1.0 / len(r.targets)
    targets, weights = targets.to(logits.device), weights.to(logits.device)
    log_p = torch.log_softmax(logits, dim=-1).gather(1, targets)
    log_p = torch.where(weights > 0, log_p, torch.zeros_like(log_p))  # padding may sit on a masked item
    losses = -(log_p * weights).sum(1)
    return losses if per_record else losses.mean()


def mask_history(logits: torch.Tensor, batch: Sequence[UserRecord]) -> torch.Tensor:
    """Push already-seen items out of the softmax (never a target), as evaluation does."""
    rows, cols = [], []
    for r, rec in enumerate(batch):
        seen = np.unique(rec.history)
        seen = seen[~np.isin(seen, rec.targets)]
        rows.append(np.full(len(seen), r))
        cols.append(seen)
    if not rows or not sum(len(c) for c in cols):
        return logits
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[torch.as_tensor(np.concatenate(rows)), torch.as_tensor(np.concatenate(cols))] = True
    return logits.masked_fill(mask, float("-inf"))


def _poisson_batches(rng: np.random.Generator, n: int, q: float, steps: int) -> list[np.ndarray]:
    """Each user independently in each step with probability q (Poisson sampling)."""
    return [np.flatnonzero(rng.random(n) < q) for _ in range(steps)]


def _shuffled_batches(rng: np.random.Generator, n: int, batch_size: int) -> list[np.ndarray]:
    order = rng.permutation(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]
