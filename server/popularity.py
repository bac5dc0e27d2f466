"""Pooling the merchants' released popularity before round 1: the coordinator's side.

Each merchant releases its item counts once under DP (`common.popularity`).
On its own, a merchant of a few dozen users gets counts that are mostly
noise. Item ids do not line up across merchants, but item text does: each
merchant sends its released counts keyed by a hash of each item's text,
sealed to the run's key; the coordinator sums them by key and sends each
merchant the pooled counts of its own keys, sealed to that merchant. From
then on every merchant's prior is the popularity its items' texts have among
all merchants' users. It is post-processing of each release: no merchant
pays ε for it.

The coordinator sees each merchant's released (noisy) counts under the
hashed text of its items. A table that does not open, is not one, or holds
non-finite counts is rejected and logged like a bad update, and its merchant
keeps its own counts.
"""

from __future__ import annotations

from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from common.arrays import to_record
from common.popularity import look_up, pool_tables, read_table
from common.round import ASK_TABLE, POOL_RECORD, TABLE_KIND, USE_POOLED, RoundConfig
from server.sealing import Envelope
from server.updates import UpdateRejected


def pool_popularity(grid: Grid, envelope: Envelope, cfg: RoundConfig, *, min_nodes: int, timeout: float | None = None) -> dict[str, Any]:
    """Ask every connected merchant for its table, sum them, and send each merchant its pooled counts.

    Returns what the round-0 line of metrics.jsonl records: the merchants
    pooled, the distinct item texts, the bytes received, and the tables
    rejected or not given, each with its silo and reason.
    """
    _, nodes = sample_nodes(grid, min_nodes, 0)
    asks = [
        Message(RecordDict({"config": cfg.to_record(), POOL_RECORD: ConfigRecord({"ask": ASK_TABLE}), **envelope.key_records()}),
                dst_node_id=node, message_type=MessageType.QUERY)
        for node in sorted(nodes)
    ]
    tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    silos: dict[int, str] = {}
    summary: dict[str, Any] = {"merchants": 0, "item_texts": 0, "bytes_received": 0, "rejected": [], "no_table": []}
    for reply in grid.send_and_receive(asks, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            summary["rejected"].append({"silo": f"node {node}", "node": node, "reason": f"error: {reply.error.reason}"})
            log(WARNING, "popularity: node %d failed: %s", node, reply.error.reason)
            continue
        info = reply.content.config_records.get("info") or ConfigRecord({})
        silo = silos[node] = str(info.get("silo", f"node {node}"))
        if not envelope.has_update(reply):
            summary["no_table"].append({"silo": silo, "reason": str(info.get("reason", ""))})
            log(INFO, "popularity: %s sends no table: %s", silo, info.get("reason", ""))
            continue
        try:
            sealed, size = envelope.open(reply, cfg.round, kind=TABLE_KIND)
            tables[node] = read_table(sealed)
        except (UpdateRejected, ValueError) as e:
            summary["rejected"].append({"silo": silo, "node": node, "reason": str(e)})
            log(WARNING, "popularity: rejected table from %s (node %d): %s", silo, node, e)
            continue
        summary["bytes_received"] += size
    if len(tables) < 2:
        log(INFO, "popularity: %d table(s), nothing to pool; every merchant keeps its own counts", len(tables))
        return summary
    pooled = pool_tables(list(tables.values()))
    sends = [
        Message(RecordDict({
            "config": cfg.to_record(), POOL_RECORD: ConfigRecord({"ask": USE_POOLED}),
            "arrays": to_record({"keys": keys, "counts": look_up(pooled, keys).astype(np.float32)}),
        }), dst_node_id=node, message_type=MessageType.QUERY)
        for node, (keys, _) in sorted(tables.items())
    ]
    for reply in grid.send_and_receive(envelope.seal_messages(grid, sends, cfg.round, cfg.to_record()), timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():  # it keeps its own counts: the pooled ones never reached its state
            summary["rejected"].append({"silo": silos.get(node, f"node {node}"), "node": node, "reason": f"error: {reply.error.reason}"})
            log(WARNING, "popularity: %s could not take the pooled counts: %s", silos.get(node, f"node {node}"), reply.error.reason)
        else:
            summary["merchants"] += 1
    summary["item_texts"] = len(pooled[0])
    log(INFO, "popularity: pooled %d merchants' released counts over %d item texts (%d bytes received)",
        summary["merchants"], summary["item_texts"], summary["bytes_received"])
    return summary
