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
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from common.logs import log
from common.messages import ASK_TABLE, TABLE_KIND, USE_POOLED
from common.popularity import look_up, pool_tables, read_table
from common.round import RoundConfig
from server import queries
from server.sealing import Envelope


def pool_popularity(
    grid: Grid, envelope: Envelope, cfg: RoundConfig, *, min_nodes: int, timeout: float | None = None
) -> dict[str, Any]:
    """Ask every connected merchant for its table, sum them, and send each merchant its pooled counts.

    Returns what the round-0 line of metrics.jsonl records: the merchants
    pooled, the distinct item texts, the bytes received, and the tables
    rejected or not given, each with its silo and reason.
    """
    _, nodes = sample_nodes(grid, min_nodes, 0)
    answers = queries.ask(grid, envelope, cfg, ASK_TABLE, nodes, kind=TABLE_KIND, timeout=timeout)
    tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for a in answers:
        if a.arrays is None:
            continue
        try:
            tables[a.node] = read_table(a.arrays)
        except ValueError as e:
            a.arrays, a.reason, a.rejected, a.size = None, str(e), True, 0
            log(WARNING, "popularity: rejected table from %s (node %d): %s", a.silo, a.node, e)
    report = queries.summary_of(answers)
    summary: dict[str, Any] = {
        "merchants": 0,
        "item_texts": 0,
        "bytes_received": report["bytes_received"],
        "rejected": report["rejected"],
        "no_table": report["no_reply"],
    }
    for a in answers:
        if a.arrays is None and not a.rejected:
            log(INFO, "popularity: %s sends no table: %s", a.silo, a.reason)
    if len(tables) < 2:
        log(INFO, "popularity: %d table(s), nothing to pool; every merchant keeps its own counts", len(tables))
        return summary
    pooled = pool_tables(list(tables.values()))
    failed = queries.hand_out(
        grid,
        envelope,
        cfg,
        USE_POOLED,
        {
            node: {"keys": keys, "counts": look_up(pooled, keys).astype(np.float32)}
            for node, (keys, _) in tables.items()
        },
        timeout=timeout,
    )
    silos = {a.node: a.silo for a in answers}
    # a merchant that could not take them keeps its own counts: the pooled ones never reached its state
    summary["rejected"] += [{"silo": silos[n], "node": n, "reason": f"error: {why}"} for n, why in failed.items()]
    summary["merchants"] = len(tables) - len(failed)
    summary["item_texts"] = len(pooled[0])
    log(
        INFO,
        "popularity: pooled %d merchants' released counts over %d item texts (%d bytes received)",
        summary["merchants"],
        summary["item_texts"],
        summary["bytes_received"],
    )
    return summary
