"""A merchant's side of a secure-aggregation round: Flower's SecAgg+ over its legacy NumPyClient API.

SecAgg+ masks what a merchant sends so that the coordinator can unmask only the
sum over merchants. Its messages have the ordinary `train` type;
`secure_aggregation_mod` tells them apart by their SecAgg+ config record and
answers them here, leaving every other message to the Message-API functions
of `client.app`. Tensors travel as plain lists, in sorted-name order.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Context, Message
from flwr.client import Client, NumPyClient
from flwr.client.message_handler.message_handler import handle_legacy_message_from_msgtype
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.merchant import Merchant
from common.arrays import l2_norm
from common.errors import SilorecError
from common.round import SECAGG_MAX_NORM_KEY, SECAGG_TENSORS_KEY, RoundConfig


class SecureAggregationError(SilorecError):
    """A SecAgg+ round cannot go on (the message does not fit this merchant's adapter)."""


def clip_norm(update: dict[str, np.ndarray], max_norm: float) -> dict[str, np.ndarray]:
    """`update` scaled down to L2 norm ≤ `max_norm` (the coordinator cannot screen a masked update)."""
    norm = l2_norm(update)
    if max_norm <= 0 or norm <= max_norm:
        return update
    return {k: (a * (max_norm / norm)).astype(a.dtype) for k, a in update.items()}


class MerchantClient(NumPyClient):
    """Train under the merchant's ledger; return the update with its users as the SecAgg+ weight."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def merchant(self, cfg: RoundConfig) -> Merchant:
        from client import app as merchant_app  # late: client.app imports this module for its mod

        return merchant_app.merchant_from_context(self.context, cfg)

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        cfg = RoundConfig.from_record(config)
        names = [n for n in str(config.get(SECAGG_TENSORS_KEY, "")).split(",") if n]
        if len(names) != len(parameters):
            raise SecureAggregationError(
                f"the server sent {len(parameters)} tensors for {len(names)} names; "
                "server and merchant must run the same silorec version"
            )
        merchant = self.merchant(cfg)
        budget = self.context.node_config.get("budget")
        outcome = merchant.train_round(dict(zip(names, parameters)), cfg, budget=float(budget) if budget else None)
        metrics: dict = {**outcome.metrics, "silo": merchant.silo.name, "reason": outcome.reason}
        update = outcome.update
        if update is not None and not all(np.isfinite(a).all() for a in update.values()):
            update, metrics["reason"] = None, "the update had non-finite values; it was left out of the sum"
        if update is None:  # every merchant must send a vector: zeros with weight 0 leave the sum unchanged
            shared = merchant.model.shared_state()  # what an update holds (LoRA B only in FFA-LoRA mode)
            return [np.zeros(tuple(shared[k].shape), np.float64) for k in sorted(shared)], 0, metrics
        update = clip_norm(update, float(config.get(SECAGG_MAX_NORM_KEY, 0.0)))
        # float64: SecAgg+ quantises (x + clipping range) in the arrays' own dtype, and in float32 that
        # sum keeps only ~7 digits, i.e. an error of ~2e-6 at a range of 25: larger than SecAgg+'s own step.
        return [update[k].astype(np.float64) for k in sorted(update)], int(outcome.metrics["users"]), metrics


def secagg_mod_for(client_fn: Callable[[Context], Client]) -> Mod:
    """A ClientApp mod that answers SecAgg+ messages with `client_fn`'s client and passes the rest on."""

    def legacy(msg: Message, context: Context) -> Message:
        return handle_legacy_message_from_msgtype(client_fn, msg, context)

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if RECORD_KEY_CONFIGS not in msg.content.config_records:
            return call_next(msg, context)
        return secaggplus_mod(msg, context, legacy)

    return mod


secure_aggregation_mod = secagg_mod_for(lambda context: MerchantClient(context).to_client())
