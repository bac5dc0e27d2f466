"""The coordinator's strategy: Flower's FedAvg sampling and messages, with screened, robust aggregation."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from common.arrays import to_record
from common.logs import log
from server.sealing import Envelope
from server.settings import ServerSettings
from server.updates import TensorSpec, UpdateRejected, aggregate, screen


@dataclass
class MerchantReport:
    node: int
    silo: str
    metrics: dict[str, float]
    status: str  # accepted | rejected | no-update | error
    reason: str = ""
    update_bytes: int = 0
    norm: float | None = None


@dataclass
class RoundResult:
    """What came of a round's replies: the aggregate (None if the round changes nothing), and each merchant's report."""

    total: dict[str, np.ndarray] | None  # the aggregated update, or a secure sum (server.secagg)
    merchants: list[MerchantReport] = field(default_factory=list)
    contributors: int = 0  # secure sums: the merchants whose shares are in it
    reason: str = ""  # why there is no aggregate
    workflow: dict[str, Any] = field(default_factory=dict)  # secure sums: the fixed-point ranges and stage times

    @property
    def accepted(self) -> list[MerchantReport]:
        return [m for m in self.merchants if m.status == "accepted"]

    @property
    def bytes_received(self) -> int:
        return sum(m.update_bytes for m in self.merchants)


class ScreenedFedAvg(FedAvg):
    """FedAvg weighted by users, over LoRA updates that are opened (unsealed) and screened first."""

    def __init__(self, spec: dict[str, TensorSpec], settings: ServerSettings, envelope: Envelope) -> None:
        super().__init__(
            fraction_train=settings.fraction_train,
            fraction_evaluate=1.0,
            min_train_nodes=settings.min_fit_clients,
            min_evaluate_nodes=settings.min_fit_clients,
            min_available_nodes=settings.min_available_clients,
            weighted_by_key="users",
        )
        self.spec = spec
        self.settings = settings
        self.envelope = envelope

    def screen_and_aggregate(self, server_round: int, replies: Iterable[Message]) -> RoundResult:
        """Open every reply, screen its update, and aggregate those that pass."""
        result = RoundResult(total=None)
        updates, weights = [], []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                result.merchants.append(MerchantReport(node, "?", {}, "error", reply.error.reason))
                log(WARNING, "round %d: node %d failed: %s", server_round, node, reply.error.reason)
                continue
            info = reply.content.config_records.get("info")
            silo = str(info["silo"]) if info else "?"
            metrics = (
                {k: float(v) for k, v in reply.content["metrics"].items()}
                if "metrics" in reply.content.metric_records
                else {}
            )
            report = MerchantReport(node, silo, metrics, "no-update", str(info["reason"]) if info else "")
            result.merchants.append(report)
            if not self.envelope.has_update(reply):
                log(
                    INFO,
                    "round %d: %s (node %d) sent no update: %s",
                    server_round,
                    silo,
                    node,
                    report.reason or "no reason given",
                )
                continue
            try:
                update, report.update_bytes = self.envelope.open(reply, server_round)
                report.norm = screen(update, self.spec, self.settings.max_update_norm)
                if metrics.get("users", 0) <= 0:
                    raise UpdateRejected("reported no users to weight the update by")
            except UpdateRejected as e:
                report.status, report.reason = "rejected", str(e)
                log(WARNING, "round %d: rejected update from %s (node %d): %s", server_round, silo, node, e)
                continue
            report.status = "accepted"
            updates.append(update)
            weights.append(metrics["users"])
        if len(updates) < self.settings.min_fit_clients:
            log(
                WARNING,
                "round %d: only %d update(s) passed screening (min-fit-clients %d); the global adapter is unchanged",
                server_round,
                len(updates),
                self.settings.min_fit_clients,
            )
            return result
        result.total = aggregate(updates, weights, self.settings.aggregation, trim=self.settings.trim)  # type: ignore[arg-type]
        return result

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's hook: the aggregated update (not the new global) and summed counts."""
        result = self.screen_and_aggregate(server_round, replies)
        metrics = MetricRecord({"accepted": len(result.accepted), "bytes-received": result.bytes_received})
        return (to_record(result.total) if result.total is not None else None), metrics


def summarize_evaluation(replies: Iterable[Message]) -> tuple[dict[str, float], list[dict]]:
    """Metrics weighted by each merchant's evaluated users, and each merchant's own."""
    per_merchant, total, sums = [], 0.0, {}
    for reply in replies:
        if reply.has_error():
            log(WARNING, "evaluation failed on node %d: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        metrics = {k: float(v) for k, v in reply.content["metrics"].items()}
        info = reply.content.config_records.get("info")
        per_merchant.append({"silo": str(info["silo"]) if info else "?", **metrics})
        users = metrics.get("users", 0.0)
        total += users
        for k, v in metrics.items():
            if k != "users":
                sums[k] = sums.get(k, 0.0) + users * v
    weighted = {k: v / total for k, v in sums.items()} if total else {}
    weighted["users"] = total
    return weighted, sorted(per_merchant, key=lambda m: m["silo"])
