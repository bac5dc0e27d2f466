"""Query messages outside the rounds: ask every merchant for something sealed to the run, or hand each one its own arrays.

Both sides of a query seal what they carry, like an update and a global
adapter (`server.sealing`): a merchant's reply to the run's key, with the
associated data naming what it is; what the coordinator hands back, to that
merchant's key. A reply that does not open is rejected and logged with its
reason, never used.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common.arrays import to_record
from common.logs import log
from common.messages import POOL_RECORD
from common.round import RoundConfig
from server.sealing import Envelope
from server.updates import UpdateRejected


@dataclass
class Answer:
    """One merchant's answer to a query: its silo, what it sent (opened) or why not, and the bytes it sent."""

    node: int
    silo: str
    arrays: dict[str, np.ndarray] | None
    reason: str = ""
    rejected: bool = False
    size: int = 0


def ask(
    grid: Grid,
    envelope: Envelope,
    cfg: RoundConfig,
    what: str,
    nodes: Iterable[int],
    *,
    kind: str,
    timeout: float | None = None,
) -> list[Answer]:
    """Ask each merchant of `nodes` for `what`; return every answer, opened (`kind` is what it must be sealed as)."""
    asks = [
        Message(
            RecordDict({"config": cfg.to_record(), POOL_RECORD: ConfigRecord({"ask": what}), **envelope.key_records()}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in sorted(nodes)
    ]
    answers = []
    for reply in grid.send_and_receive(asks, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            answers.append(Answer(node, f"node {node}", None, f"error: {reply.error.reason}", rejected=True))
            log(WARNING, "%s: node %d failed: %s", what, node, reply.error.reason)
            continue
        info = reply.content.config_records.get("info") or ConfigRecord({})
        silo, reason = str(info.get("silo", f"node {node}")), str(info.get("reason", ""))
        if not envelope.has_update(reply):
            answers.append(Answer(node, silo, None, reason))
            continue
        try:
            arrays, size = envelope.open(reply, cfg.round, kind=kind)
        except UpdateRejected as e:
            answers.append(Answer(node, silo, None, str(e), rejected=True))
            log(WARNING, "%s: rejected the reply of %s (node %d): %s", what, silo, node, e)
            continue
        answers.append(Answer(node, silo, arrays, reason, size=size))
    return sorted(answers, key=lambda a: a.node)


def hand_out(
    grid: Grid,
    envelope: Envelope,
    cfg: RoundConfig,
    what: str,
    arrays: Mapping[int, Mapping[str, np.ndarray]],
    *,
    timeout: float | None = None,
) -> dict[int, str]:
    """Send each merchant (node) its own `arrays`, sealed to it; return the nodes that failed to take them, with why."""
    sends = [
        Message(
            RecordDict(
                {"config": cfg.to_record(), POOL_RECORD: ConfigRecord({"ask": what}), "arrays": to_record(dict(a))}
            ),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node, a in sorted(arrays.items())
    ]
    sealed = envelope.seal_messages(grid, sends, cfg.round, cfg.to_record())
    failed = {m.metadata.dst_node_id: "no reply in time" for m in sealed}  # until it replies
    failed |= {node: "gave no sealing key" for node in arrays if node not in failed}
    for reply in grid.send_and_receive(sealed, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            failed[node] = str(reply.error.reason)
        else:
            failed.pop(node, None)
    for node, why in failed.items():
        log(WARNING, "%s: node %d could not take it: %s", what, node, why)
    return failed


def summary_of(answers: Iterable[Answer]) -> dict[str, Any]:
    """What metrics.jsonl records of a query: replies rejected and merchants that sent nothing, with reasons."""
    answers = list(answers)
    return {
        "rejected": [{"silo": a.silo, "node": a.node, "reason": a.reason} for a in answers if a.rejected],
        "no_reply": [{"silo": a.silo, "reason": a.reason} for a in answers if a.arrays is None and not a.rejected],
        "bytes_received": sum(a.size for a in answers),
    }
