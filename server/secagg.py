"""The coordinator's round loop with secure aggregation: Flower's SecAgg+, so it learns only the sum of updates.

Flower offers SecAgg+ only through its legacy workflow API (LegacyContext,
SecAggPlusWorkflow, a legacy Strategy); this module keeps all of that in one
place. Each merchant sends users·update and users, masked; the workflow
unmasks only their sums and divides, which is users-weighted FedAvg. No
single update is ever seen, so none can be screened: merchants clip their own
update to `max-update-norm`, and robust aggregation is not available.

Fixed-point choices (SecAgg+ adds integers modulo 2**32):
- clipping range = max-update-norm: a merchant's update has L2 norm ≤ that
  bound, so every coordinate does too, and SecAgg+'s clip never changes a value;
- max weight = twice the most users any merchant has reported, so users/max
  weight stays ≤ 1 and the weights use most of the quantisation range;
- quantisation range = the largest power of two Q with 2·(n+1)·Q ≤ 2**32 for n
  merchants, so the masked sums of values and weights never wrap around.
The mean is then exact up to stochastic rounding of about 2·bound/Q per
merchant and coordinate, scaled by max weight/users.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.common import FitRes, Parameters, log, parameters_to_ndarrays
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat import LegacyContext
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.arrays import to_record
from common.errors import SilorecError
from common.round import SECAGG_MAX_NORM_KEY, SECAGG_TENSORS_KEY
from server import checkpoint, report
from server.federation import apply_update, evaluate_global, finish_run, round_line, start_run
from server.settings import ServerSettings
from server.strategy import MerchantReport, TrainRound

NUM_SHARES = 1.0  # every sampled merchant holds a share of every other's secrets (full SecAgg graph)
RECONSTRUCTION_THRESHOLD = 2 / 3  # of the shares: a round survives a third dropping out, fewer colluders unmask no one
DEFAULT_MAX_WEIGHT = 1000.0  # before any merchant has reported its users (Flower's default)
MODULUS = 2**32


def quantization_range(merchants: int) -> int:
    """The largest power of two Q with 2·(merchants+1)·Q ≤ 2**32: sums of n values in [0, Q] never wrap."""
    return 1 << ((MODULUS // (2 * (merchants + 1))).bit_length() - 1)


class SumCollector(LegacyFedAvg):
    """The legacy strategy SecAgg+ drives: samples merchants, hands them the round's config, keeps the sum."""

    def __init__(self, settings: ServerSettings) -> None:
        super().__init__(
            fraction_fit=settings.fraction_train, fraction_evaluate=0.0, min_fit_clients=settings.min_fit_clients,
            min_available_clients=settings.min_available_clients, on_fit_config_fn=lambda _: self.fit_config,
        )
        self.settings = settings
        self.fit_config: dict[str, Any] = {}
        self.update_names: list[str] = []  # the shared tensors, sorted: the order merchants send them in
        self.result: TrainRound | None = None

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list
    ) -> tuple[Parameters | None, dict]:
        """Every result carries the unmasked users-weighted mean; the metrics are each merchant's own."""
        result = TrainRound(delta=None)
        for proxy, res in results:
            metrics = {k: float(v) for k, v in res.metrics.items() if isinstance(v, (int, float))}
            trained = res.num_examples > 0
            merchant = MerchantReport(proxy.node_id, str(res.metrics.get("silo", "?")), metrics,
                                      "accepted" if trained else "no-update", str(res.metrics.get("reason", "")))
            merchant.update_bytes = sum(a.size for a in parameters_to_ndarrays(res.parameters)) * 8  # masked int64
            result.merchants.append(merchant)
        for failure in failures:
            result.merchants.append(MerchantReport(-1, "?", {}, "error", str(failure)))
        if len(result.accepted) >= self.settings.min_fit_clients and results:
            mean = parameters_to_ndarrays(results[0][1].parameters)
            if all(np.isfinite(a).all() for a in mean):
                result.delta = dict(zip(self.update_names, mean, strict=True))
            else:
                log(WARNING, "round %d: the unmasked sum is not finite; the global adapter is unchanged", server_round)
        else:
            log(WARNING, "round %d: only %d merchant(s) trained (min-fit-clients %d); the global adapter is unchanged",
                server_round, len(result.accepted), self.settings.min_fit_clients)
        self.result = result
        return None, {}


def check(settings: ServerSettings) -> None:
    """Raise SilorecError if `settings` ask for something that SecAgg+ cannot give."""
    if settings.aggregation != "fedavg":
        raise SilorecError(f"aggregation {settings.aggregation!r} needs each update in the clear; with "
                           "secure-aggregation = true only fedavg is possible: choose one of the two")
    if settings.min_fit_clients < 2:
        raise SilorecError(
            "secure aggregation over one merchant reveals that merchant's update: set min-fit-clients to 2 or more"
        )


def run_secure_federation(grid: Grid, context: Context, settings: ServerSettings) -> dict[str, Any]:
    """Like `server.federation.run_federation`, but every round's update is the SecAgg+ sum; return the final metrics."""
    check(settings)
    out = Path(settings.out_dir)
    ckpt_dir = out / "checkpoint"
    tower, initial, shared, ckpt = start_run(settings)
    evaluator = FedAvg(fraction_evaluate=1.0, min_evaluate_nodes=settings.min_fit_clients,
                       min_available_nodes=settings.min_available_clients)
    run_id = ckpt.run_id if ckpt else uuid.uuid4().hex[:12]
    global_arrays = ckpt.global_arrays if ckpt else initial
    history: list[dict[str, Any]] = ckpt.history if ckpt else []
    base = replace(settings.round, run_id=run_id, rounds=settings.rounds)
    log(INFO, "silorec run %s: rounds %d..%d with secure aggregation (SecAgg+): the coordinator sees only sums",
        run_id, ckpt.round + 1 if ckpt else 1, settings.rounds)

    collector = SumCollector(settings)
    collector.update_names = sorted(shared)
    legacy = LegacyContext(context, ServerConfig(num_rounds=settings.rounds, round_timeout=settings.round_timeout),
                           collector, SimpleClientManager())
    _, stop, ready = start_update_client_manager_thread(grid, legacy.client_manager)
    ready.wait()
    try:
        if not history:  # round 0: the untrained adapter, the reference every round is compared with
            valid, per_merchant = evaluate_global(evaluator, grid, global_arrays, replace(base, round=0, split="valid"))
            history.append({"round": 0, "valid": valid, "users": {m["silo"]: m.get("users", 0) for m in per_merchant}})
            checkpoint.save(ckpt_dir, checkpoint.Checkpoint(run_id, 0, global_arrays, history))
        for rnd in range(ckpt.round + 1 if ckpt else 1, settings.rounds + 1):
            t0 = time.perf_counter()
            cfg = replace(base, round=rnd)
            names = sorted(global_arrays)
            collector.fit_config = dict(cfg.to_record()) | {SECAGG_TENSORS_KEY: ",".join(names),
                                                             SECAGG_MAX_NORM_KEY: settings.max_update_norm}
            collector.result = None
            legacy.state.array_records[MAIN_PARAMS_RECORD] = to_record({k: global_arrays[k] for k in names})
            legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
            workflow = _workflow(settings, history, merchants=len(grid.get_node_ids()))
            workflow(grid, legacy)
            result = collector.result or TrainRound(delta=None)
            global_arrays = apply_update(global_arrays, result.delta)
            valid, _ = evaluate_global(evaluator, grid, global_arrays, replace(cfg, split="valid"))
            line = round_line(rnd, result, valid, time.perf_counter() - t0)
            line |= {
                "users": {m.silo: m.metrics.get("users", 0) for m in result.merchants},
                "secagg": {"clipping_range": workflow.clipping_range, "quantization_range": workflow.quantization_range,
                           "max_weight": workflow.max_weight},  # what bounds the rounding error of this round's mean
            }
            history.append(line)
            report.write_rounds(out, history)
            checkpoint.save(ckpt_dir, checkpoint.Checkpoint(run_id, rnd, global_arrays, history, {"aggregation": "secagg+"}))
            log(INFO, "round %d/%d: %d/%d merchants in the secure sum, valid NDCG@10 %.4f, %s, %.0f s",
                rnd, settings.rounds, line["accepted"], line["merchants"], valid.get("ndcg@10", float("nan")),
                f"max ε {max(line['epsilon'].values()):.2f}" if line["epsilon"] else "non-private", line["seconds"])
        test, per_merchant = evaluate_global(evaluator, grid, global_arrays, replace(base, round=settings.rounds, split="test"))
    finally:
        stop.set()
    return finish_run(
        settings, base, tower, global_arrays, history, test, per_merchant,
        update_bytes=int(sum(a.size for a in shared.values()) * 8),  # SecAgg+ sends masked int64 values
        extra={"secure_aggregation": True},
    )


def _workflow(settings: ServerSettings, history: list[dict[str, Any]], *, merchants: int) -> SecAggPlusWorkflow:
    known = [u for h in history for u in h.get("users", {}).values() if u]
    return SecAggPlusWorkflow(
        num_shares=NUM_SHARES, reconstruction_threshold=RECONSTRUCTION_THRESHOLD,
        max_weight=2.0 * max(known) if known else DEFAULT_MAX_WEIGHT,
        clipping_range=float(settings.max_update_norm), quantization_range=quantization_range(max(merchants, 2)),
        modulus_range=MODULUS, timeout=settings.round_timeout,
    )
