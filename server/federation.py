"""The coordinator's round loop: sample, send, screen, aggregate, evaluate, checkpoint.

Follows "One round" of DESIGN.md. Every round ends with an atomic
checkpoint, so `resume` continues from the last complete round.
"""

from __future__ import annotations

import time
from dataclasses import replace
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from peft import get_peft_model_state_dict

from common import atomic
from common.arrays import nbytes, to_numpy, to_record
from common.errors import SilorecError
from common.round import RoundConfig
from common.serve import PRIOR_WEIGHT, best_scale, parse_scales, scale_prior_weight, scaled_key
from common.towers import attach_adapter, initial_calibration, load_encoder
from server import checkpoint, report, sealing
from server.popularity import pool_popularity
from server.settings import ServerSettings
from server.strategy import ScreenedFedAvg, summarize_evaluation
from server.updates import spec_of


def run_federation(grid: Grid, settings: ServerSettings, *, state_key: bytes | None = None) -> dict[str, Any]:
    """Run (or resume) the federation described by `settings`; write its outputs; return the final metrics.

    `state_key` encrypts the run's sealing key at rest so that `resume` keeps it.
    """
    out = Path(settings.out_dir)
    ckpt_dir = out / "checkpoint"
    tower, initial, shared, ckpt = start_run(settings)
    envelope = sealing.envelope_for(settings, ckpt_dir, ckpt.run_id if ckpt else None, state_key=state_key)
    run_id = envelope.run_id
    strategy = ScreenedFedAvg(spec_of(shared), settings, envelope)
    global_arrays = ckpt.global_arrays if ckpt else initial
    history: list[dict[str, Any]] = ckpt.history if ckpt else []
    start_round = ckpt.round + 1 if ckpt else 1
    base = replace(settings.round, run_id=run_id, rounds=settings.rounds)
    tuning = prior_scales(settings)
    if tuning:  # valid evaluations also score each factor of the prior's weight
        base = replace(base, score_scales=",".join(f"{k:g}" for k in tuning))
    log(INFO, "silorec run %s: rounds %d..%d, update %d bytes (%d tensors), aggregation %s",
        run_id, start_round, settings.rounds, nbytes(shared), len(shared), settings.aggregation)

    if not history:  # round 0: the untrained adapter, the reference every round is compared with
        zero = replace(base, round=0, split="valid")
        pooled = None
        if settings.pool_popularity and zero.private and zero.prior_noise > 0:
            pooled = pool_popularity(grid, envelope, zero, min_nodes=settings.min_available_clients, timeout=settings.round_timeout)
        valid, _ = evaluate_global(strategy, grid, global_arrays, zero, envelope)
        history.append({"round": 0, "valid": valid} | ({"pooled_popularity": pooled} if pooled is not None else {}))
        checkpoint.save(ckpt_dir, checkpoint.Checkpoint(run_id, 0, global_arrays, history))

    for rnd in range(start_round, settings.rounds + 1):
        t0 = time.perf_counter()
        envelope.open_seconds = envelope.global_seal_seconds = 0.0
        cfg = replace(base, round=rnd)
        messages = envelope.seal_messages(grid, strategy.configure_train(rnd, to_record(global_arrays), cfg.to_record(), grid), rnd, cfg.to_record())
        result = strategy.screen_and_aggregate(rnd, grid.send_and_receive(messages, timeout=settings.round_timeout))
        global_arrays = apply_update(global_arrays, result.delta)
        valid, _ = evaluate_global(strategy, grid, global_arrays, replace(cfg, split="valid"), envelope)
        line = round_line(rnd, result, valid, time.perf_counter() - t0)
        line["open_seconds"] = round(envelope.open_seconds, 6)
        line["global_seal_seconds"] = round(envelope.global_seal_seconds, 6)  # the round's train and evaluate messages
        history.append(line)
        report.write_rounds(out, history)
        checkpoint.save(ckpt_dir, checkpoint.Checkpoint(run_id, rnd, global_arrays, history, {"aggregation": settings.aggregation}))
        eps = f"max ε {max(line['epsilon'].values()):.2f}" if line["epsilon"] else "non-private"
        log(INFO, "round %d/%d: %d/%d updates accepted, loss %.3f, valid NDCG@10 %.4f, %s, %.0f s",
            rnd, settings.rounds, line["accepted"], line["merchants"], line.get("loss", float("nan")),
            valid.get("ndcg@10", float("nan")), eps, line["seconds"])

    global_arrays, prior_weight = tune_prior_weight(global_arrays, history[-1]["valid"], tuning)
    test_cfg = replace(base, round=settings.rounds, split="test", score_scales="")  # test users choose nothing
    test, per_merchant = evaluate_global(strategy, grid, global_arrays, test_cfg, envelope)
    return finish_run(
        settings, base, tower, global_arrays, history, test, per_merchant,
        update_bytes=nbytes(shared), extra={"sealed": settings.seal_updates, "prior_weight": prior_weight},
    )


def prior_scales(settings: ServerSettings) -> tuple[float, ...]:
    """The factors of the prior's weight to choose from after the last round; () where there is no prior to weigh."""
    try:
        scales = parse_scales(settings.prior_scales)
    except ValueError as e:
        raise SilorecError(f"prior-scales: {e}") from None
    return scales if settings.round.private and settings.round.prior_noise > 0 else ()


def tune_prior_weight(
    arrays: dict[str, np.ndarray], valid: dict[str, float], scales: tuple[float, ...]
) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """The final adapter with its prior's weight scaled by the factor of `scales` with the best
    validation NDCG@10 over all merchants' users (`valid`, the last round's), and what was chosen."""
    ndcg = {k: valid[scaled_key(k)] for k in scales if scaled_key(k) in valid}
    if not ndcg:
        return arrays, None
    scale = best_scale(ndcg)
    learned = float(np.asarray(arrays[PRIOR_WEIGHT]).ravel()[0])
    log(INFO, "prior weight: learned %.3f; ×%g scores best on validation (NDCG@10 %.4f; %s)", learned, scale, ndcg[scale],
        ", ".join(f"×{k:g} {v:.4f}" for k, v in ndcg.items()))
    chosen = {"learned": learned, "scale": scale, "weight": learned * scale, "valid_ndcg@10": {f"{k:g}": v for k, v in ndcg.items()}}
    return scale_prior_weight(arrays, scale), chosen


def apply_update(global_arrays: dict[str, np.ndarray], delta: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """The global adapter moved by an aggregated update (unchanged when no update passed)."""
    if delta is None:
        return global_arrays
    return {k: (v + delta[k]).astype(v.dtype) if k in delta else v for k, v in global_arrays.items()}


def start_run(
    settings: ServerSettings,
) -> tuple[Any, dict[str, np.ndarray], dict[str, np.ndarray], checkpoint.Checkpoint | None]:
    """The user tower, its initial adapter, the part merchants send back, and the checkpoint to resume (if asked)."""
    out = Path(settings.out_dir)
    model_cfg = settings.round.model()
    encoder = load_encoder(model_cfg.base_model)[1]
    tower = attach_adapter(encoder, model_cfg)
    calibration = to_numpy(initial_calibration(encoder.config.hidden_size, model_cfg))
    lora = to_numpy(get_peft_model_state_dict(tower))
    initial = lora | calibration
    shared = ({k: v for k, v in lora.items() if "lora_B" in k} if model_cfg.ffa else lora) | calibration
    ckpt = checkpoint.load(out / "checkpoint") if settings.resume else None
    if ckpt is None and (out / "checkpoint" / checkpoint.STATE_FILE).exists():
        raise SilorecError(f"{out} holds an earlier run; resume it with --resume or choose another output folder")
    return tower, initial, shared, ckpt


def finish_run(
    settings: ServerSettings, base: RoundConfig, tower: Any, global_arrays: dict[str, np.ndarray], history: list[dict[str, Any]],
    test: dict[str, float], per_merchant: list[dict], *, update_bytes: int, extra: dict[str, Any],
) -> dict[str, Any]:
    """Write metrics.json, the adapter in peft format with its model card, and the plots; return the metrics."""
    out = Path(settings.out_dir)
    final_eps = last_epsilons(history)
    merchants = [
        {"silo": m["silo"], "users": m.get("users", 0), "epsilon-total": final_eps.get(m["silo"], {}).get("epsilon"),
         "delta": final_eps.get(m["silo"], {}).get("delta")}
        for m in per_merchant
    ]
    metrics = {
        "run_id": base.run_id,
        "rounds": settings.rounds,
        "test": {k: v for k, v in test.items() if not k.startswith("most-pop")},
        "most_pop_local": {k.removeprefix("most-pop-"): v for k, v in test.items() if k.startswith("most-pop")},
        "test_per_merchant": per_merchant,
        "epsilon_max": max((e["epsilon"] for e in final_eps.values()), default=None),
        "merchants": merchants,
        "update_bytes": update_bytes,
        **extra,
        "seed": settings.round.seed,
        "config": {"server": {k: v for k, v in vars(settings).items() if k != "round"}, "round": vars(base)},
    }
    atomic.write_json(out / "metrics.json", metrics)
    card = report.model_card(base.model(), rounds=settings.rounds, merchants=merchants, test=test, run_id=base.run_id)
    report.export_adapter(out / "adapter", tower, global_arrays, base.model(), card)
    report.plot_run(out, history)
    return metrics


def evaluate_global(
    strategy: FedAvg, grid: Grid, arrays: dict[str, np.ndarray], cfg: RoundConfig, envelope: sealing.Envelope | None = None
) -> tuple[dict, list]:
    """Every merchant's metrics of the global adapter on `cfg.split`, weighted by evaluated users, and each merchant's own."""
    messages = strategy.configure_evaluate(cfg.round, to_record(arrays), cfg.to_record(), grid)
    if envelope is not None:
        messages = envelope.seal_messages(grid, messages, cfg.round, cfg.to_record())
    return summarize_evaluation(grid.send_and_receive(messages))


def round_line(rnd: int, result, valid: dict, seconds: float) -> dict[str, Any]:
    trained = [m for m in result.merchants if "loss" in m.metrics]
    users = sum(m.metrics["users"] for m in trained)
    line: dict[str, Any] = {
        "round": rnd,
        "merchants": len(result.merchants),
        "accepted": len(result.accepted),
        "valid": valid,
        "epsilon": {m.silo: m.metrics["epsilon-total"] for m in result.merchants if "epsilon-total" in m.metrics},
        "delta": {m.silo: m.metrics["delta"] for m in result.merchants if "delta" in m.metrics},
        "updates_received": sum(1 for m in result.merchants if m.update_bytes),
        "bytes_received": result.bytes_received,
        "seal_seconds": round(sum(m.metrics.get("seal-seconds", 0.0) for m in result.merchants), 6),
        "seconds": round(seconds, 2),
        "rejected": [{"silo": m.silo, "node": m.node, "reason": m.reason} for m in result.merchants if m.status in ("rejected", "error")],
        "no_update": [{"silo": m.silo, "reason": m.reason} for m in result.merchants if m.status == "no-update"],
    }
    if users:
        line["loss"] = sum(m.metrics["loss"] * m.metrics["users"] for m in trained) / users
    return line


def last_epsilons(history: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each merchant's latest reported total ε and its δ."""
    out: dict[str, dict[str, float]] = {}
    for h in history:
        for silo, eps in h.get("epsilon", {}).items():
            out[silo] = {"epsilon": eps, "delta": h.get("delta", {}).get(silo)}
    return out
