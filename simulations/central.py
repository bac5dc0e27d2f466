"""The centralised baseline: one silo (all users pooled), no federation.

It is the upper bound a federated run is measured against: same model, same
training function, same split and metrics, early-stopped on validation
NDCG@10. With `epsilon` set it trains with user-level DP-SGD, so the cost of
privacy can be read apart from the cost of federation.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common import atomic
from common.cooccurrence import release_top_cooccurrence
from common.encoder import default_device
from common.metrics import evaluate, metrics_from_ranks, most_pop, ranks_of, save_ranks
from common.model_config import ModelConfig
from common.plots import plot_curves
from common.popularity import accountant_entry, prior_from_counts, release_prior
from common.pseudonym import key_for, pseudonyms
from common.recommender import build_recommender
from common.serve import scorer
from common.setting import setting
from common.silo import load_silo
from common.split import leave_one_out
from common.text import item_texts
from common.train import TrainConfig, TrainResult, train


@dataclass(frozen=True)
class CentralConfig:
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    # A DP run trains every planned epoch (patience None): one epoch's validation NDCG@10 is too
    # noisy to stop on. The best epoch by validation is kept either way.
    patience: int | None = setting(
        3,
        "Stop after this many epochs without a better validation NDCG@10 (without DP; with DP every epoch is trained).",
    )
    # A DP run releases these once before training, in the same accountant; a non-private run
    # releases nothing and its head learns both.
    prior_noise: float = setting(
        2.0,
        "Noise multiplier of an item-popularity prior released once before training and counted in ε (DP runs "
        "only); 0: no prior.",
    )
    cooccurrence_noise: float = setting(
        1.0,
        "Noise multiplier of the item co-occurrence among the prior's top items, released once after it and counted "
        "in ε (DP runs only; needs the prior); 0: none.",
    )


def run_central(
    data: Path, out: Path, cfg: CentralConfig, *, cache_dir: Path | None = None, force: bool = False, log=print
) -> dict:
    """Train on all of `data`, write metrics.json, adapter/ and a plot to `out`, and return the metrics."""
    start = time.perf_counter()
    device = default_device()
    silo = load_silo(data)
    split = leave_one_out(silo.interactions, silo.n_items)
    baseline = most_pop(split)
    log(f"{silo.name}: {split.n_users} users, {silo.n_items} items, {len(split.test)} evaluated; device {device}")
    log(f"MostPop   valid NDCG@10 {baseline['valid']['ndcg@10']:.4f}   test NDCG@10 {baseline['test']['ndcg@10']:.4f}")
    model = build_recommender(
        cfg.model, list(silo.items["item_id"]), item_texts(silo.items), device=device, cache_dir=cache_dir
    )
    score = scorer(model)
    released: list[tuple[float, float, int]] = []
    if cfg.train.private and cfg.prior_noise > 0:
        counts = release_prior(split.train, silo.n_items, cfg.prior_noise, seed=cfg.train.noise_seed)
        released.append(accountant_entry(cfg.prior_noise))
        model.set_prior(prior_from_counts(counts))
        log(f"popularity prior released with noise multiplier {cfg.prior_noise:g} (in ε)")
    if cfg.train.private and cfg.cooccurrence_noise > 0:  # refused without the prior, which picks its items
        # an experiment's fixed noise seed must not give the two releases the same noise
        seed = None if cfg.train.noise_seed is None else cfg.train.noise_seed + 1
        prior = model.prior.cpu().numpy()
        model.set_neighbours(*release_top_cooccurrence(prior, split.train, cfg.cooccurrence_noise, seed=seed))
        released.append(accountant_entry(cfg.cooccurrence_noise))
        log(
            f"co-occurrence of the {len(model.neighbour_items)} most popular items released with noise multiplier "
            f"{cfg.cooccurrence_noise:g} (in ε)"
        )

    history: list[dict] = []
    best = {"ndcg": -1.0, "epoch": 0, "shared": model.shared_state(), "head": model.local_state()}
    if released:  # the released statistics alone are a model already: training must beat them on validation
        start_ndcg = evaluate(score, split.valid, desc="validation")["ndcg@10"]
        best["ndcg"] = start_ndcg
        log(f"epoch  0 (released statistics, untrained)   valid NDCG@10 {start_ndcg:.4f}")

    def on_epoch(epoch: int, result: TrainResult) -> bool:
        valid = evaluate(score, split.valid, desc="validation")
        history.append({"epoch": epoch + 1, "loss": result.losses[-1], "valid": valid, "epsilon": result.epsilon})
        improved = valid["ndcg@10"] > best["ndcg"]
        if improved:
            best.update(ndcg=valid["ndcg@10"], epoch=epoch + 1, shared=model.shared_state(), head=model.local_state())
        eps = f"   ε {result.epsilon:.2f}" if result.epsilon is not None else ""
        log(
            f"epoch {epoch + 1:>2}/{cfg.train.epochs}  loss {result.losses[-1]:.3f}   valid NDCG@10 "
            f"{valid['ndcg@10']:.4f}"
            f"   HR@10 {valid['hr@10']:.4f}{eps}{'   *' if improved else ''}"
        )
        return cfg.patience is not None and epoch + 1 - best["epoch"] >= cfg.patience

    result = train(model, split, cfg.train, history=released, on_epoch=on_epoch)
    model.load_shared_state(best["shared"])
    model.load_local_state(best["head"], model.item_ids)
    ranks = {name: ranks_of(score, getattr(split, name), desc=name) for name in ("valid", "test")}
    valid, test = metrics_from_ranks(ranks["valid"]), metrics_from_ranks(ranks["test"])
    metrics = {
        "test": test,
        "valid": valid,
        "most_pop": baseline,
        "epsilon": result.epsilon,  # over every epoch trained, not only up to the best one
        "delta": result.delta,
        "noise_multiplier": result.noise_multiplier,
        "sample_rate": result.sample_rate,
        "prior_noise": cfg.prior_noise if model.has_prior else None,
        "cooccurrence_noise": cfg.cooccurrence_noise if model.has_neighbours else None,
        "steps": result.steps,
        "seed": cfg.train.seed,
        "epochs": result.epochs,
        "best_epoch": best["epoch"],
        "wall_seconds": round(time.perf_counter() - start, 1),
        "train_seconds": round(result.seconds, 1),
        "device": device_name(device),
        "data": str(data),
        "model": cfg.model.to_json(),
        "train": asdict(cfg.train),
        "history": history,
    }
    key = key_for(data)  # ranks name users by pseudonym; the silo's runs pair up under its key
    with atomic.directory(out, replace=force, made_by="silorec-sim central") as scratch:
        model.save(scratch / "adapter")
        atomic.write_json(scratch / "metrics.json", metrics)
        save_ranks(
            scratch,
            {
                name: dict(zip(pseudonyms(key, (c.user_id for c in getattr(split, name))), r.tolist()))
                for name, r in ranks.items()
            },
            model="centralised" + ("" if result.epsilon is None else " DP"),
        )
        plot_curves(
            scratch / "training.png",
            {"train loss": [h["loss"] for h in history]},
            {"valid NDCG@10": [h["valid"]["ndcg@10"] for h in history]},
            reference={"MostPop valid NDCG@10": baseline["valid"]["ndcg@10"]},
            title="centralised, " + (f"ε={result.epsilon:.2f}" if result.epsilon is not None else "non-private"),
        )
    return metrics


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
