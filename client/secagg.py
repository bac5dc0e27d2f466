"""A merchant's side of a secure sum: Flower's SecAgg+ over its legacy NumPyClient API.

SecAgg+ masks what a merchant sends so that the coordinator can unmask only the
sum over merchants. Its messages have the ordinary `train` type;
`secure_aggregation_mod` tells them apart by their SecAgg+ config record and
answers them here, leaving every other message to the Message-API functions
of `client.app`. What a sum asks for is the `SumSpec` in its fit config:

- `update` (silo mode): the merchant's update under its own DP, clipped to
  the run's bound, weighted by its users;
- `gradient`, `popularity`, `cooccurrence` (federation mode): a share on the
  lattice of `common.distributed_dp`, weight 1. The merchant checks that
  SecAgg+ will carry it unchanged, and will not help unmask a sum with
  fewer merchants than the spec's `min_replies`: their noise together would
  be less than the step's privacy needs.

A merchant that refuses (its budget, a mismatched spec) raises: SecAgg+ then
treats it as dropped out and recovers the others' sum without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.client import Client, NumPyClient
from flwr.client.message_handler.message_handler import handle_legacy_message_from_msgtype
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common.recorddict_compat import recorddict_to_fitins

from client.node_config import NodeConfig
from common.arrays import l2_norm
from common.distributed_dp import Lattice
from common.errors import SecureAggregationError
from common.messages import SEALED_GLOBAL_KEY, SumSpec

if TYPE_CHECKING:
    from client.merchant import Merchant
    from common.round import RoundConfig

SUM_STATE = "silorec-secure-sum"  # what a merchant remembers of the sum it is in (context.state), for the unmask stage


def clip_norm(update: dict[str, np.ndarray], max_norm: float) -> dict[str, np.ndarray]:
    """`update` scaled down to L2 norm ≤ `max_norm` (the coordinator cannot screen a masked update)."""
    norm = l2_norm(update)
    if max_norm <= 0 or norm <= max_norm:
        return update
    return {k: (a * (max_norm / norm)).astype(a.dtype) for k, a in update.items()}


class MerchantClient(NumPyClient):
    """Answer a secure sum's fit with what its spec asks of this merchant."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        # Only this stage needs the model (torch and the rest, seconds to import in a fresh
        # ClientApp process); SecAgg+'s setup, key-sharing and unmasking stages never load it.
        from client.merchant import merchant_for_node
        from common.round import RoundConfig

        cfg = RoundConfig.from_record(config)
        spec = SumSpec.from_config(config)
        node = NodeConfig.parse(self.context.node_config)
        node.check_privacy(cfg.private, f"a secure sum ({spec.task})")
        merchant = merchant_for_node(node, cfg)
        if spec.lattice is not None:
            check_ranges(self.context, spec.lattice, merchant.silo.name)
        sealed = self._sealed(merchant, parameters, config, cfg)
        if spec.task == "update":
            return self._update(merchant, sealed, cfg, spec, node.budget)
        if spec.task == "gradient":
            arrays, metrics = merchant.gradient_share(sealed, cfg, spec, budget=node.budget)
        else:
            arrays, metrics = merchant.release_share(cfg, spec, sealed["keys"], budget=node.budget)
        return arrays, 1, {**metrics, "silo": merchant.silo.name, "reason": ""}

    def _sealed(
        self, merchant: Merchant, parameters: list[np.ndarray], config: dict, cfg: RoundConfig
    ) -> dict[str, np.ndarray]:
        """What the sum sealed to this merchant in its config (the global adapter, or a release's item keys), or, in a
        run without sealing, the parameters."""
        from client.sealing import merchant_key, open_global

        if SEALED_GLOBAL_KEY in config:
            return open_global(
                bytes(config[SEALED_GLOBAL_KEY]),
                cfg,
                self.context.node_id,
                merchant_key(merchant.state_dir),
                kind="global-secagg",
            )
        names = [n for n in str(config.get("sum-global-names", "")).split(",") if n]
        if len(names) != len(parameters):
            raise SecureAggregationError(
                f"the server sent {len(parameters)} tensors for {len(names)} names; "
                "server and merchant must run the same silorec version"
            )
        return dict(zip(names, parameters))

    def _update(
        self,
        merchant: Merchant,
        global_arrays: dict[str, np.ndarray],
        cfg: RoundConfig,
        spec: SumSpec,
        budget: float | None,
    ) -> tuple[list[np.ndarray], int, dict]:
        """Silo mode: train under the merchant's ledger; the update with its users as the SecAgg+ weight."""
        outcome = merchant.train_round(global_arrays, cfg, budget=budget)
        metrics: dict = {**outcome.metrics, "silo": merchant.silo.name, "reason": outcome.reason}
        update = outcome.update
        if update is not None and not all(np.isfinite(a).all() for a in update.values()):
            update, metrics["reason"] = None, "the update had non-finite values; it was left out of the sum"
        if update is None:  # every merchant must send a vector: zeros with weight 0 leave the sum unchanged
            shared = merchant.model.shared_state()  # what an update holds (LoRA B only in FFA-LoRA mode)
            return [np.zeros(tuple(shared[k].shape), np.float64) for k in spec.names], 0, metrics
        if sorted(update) != sorted(spec.names):
            raise SecureAggregationError(
                f"{merchant.silo.name}: the coordinator sums {len(spec.names)} tensors, this merchant "
                f"shares {len(update)}; server and merchant must run the same silorec version"
            )
        update = clip_norm(update, spec.clip)
        # float64: SecAgg+ quantises (x + clipping range) in the arrays' own dtype, and in float32 that
        # sum keeps only ~7 digits, i.e. an error of ~2e-6 at a range of 25: larger than SecAgg+'s own step.
        return [update[k].astype(np.float64) for k in spec.names], int(outcome.metrics["users"]), metrics


def check_ranges(context: Context, lattice: Lattice, silo: str) -> None:
    """SecureAggregationError unless this node's SecAgg+ setup carries the lattice's integers unchanged."""
    state = context.state.config_records.get(RECORD_KEY_STATE)
    setup = {k: state.get(k) for k in ("clipping_range", "target_range", "mod_range", "max_weight")} if state else {}
    want = {
        "clipping_range": float(lattice.half),
        "target_range": lattice.range,
        "mod_range": lattice.modulus,
        "max_weight": 1.0,
    }
    if setup != want:
        raise SecureAggregationError(
            f"{silo}: SecAgg+ was set up with {setup}, not the {want} its shares need "
            "to sum exactly; refusing rather than sending a share it would clip"
        )


def _enough(merchants: int, need: int, where: str) -> None:
    """SecureAggregationError if fewer merchants than `need` are `where`: their noise together is less than DP needs."""
    if merchants < need:
        raise SecureAggregationError(
            f"only {merchants} merchant(s) are {where}, fewer than the {need} whose noise it needs: "
            "refusing to take part"
        )


def secagg_mod_for(client_fn: Callable[[Context], Client]) -> Mod:
    """A ClientApp mod that answers SecAgg+ messages with `client_fn`'s client and passes the rest on."""

    def legacy(msg: Message, context: Context) -> Message:
        return handle_legacy_message_from_msgtype(client_fn, msg, context)

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is None:
            return call_next(msg, context)
        stage = configs.get(Key.STAGE)
        if stage == Stage.COLLECT_MASKED_VECTORS:  # before anything is computed or spent: are there enough others?
            need = SumSpec.from_config(recorddict_to_fitins(msg.content, keep_input=True).config).min_replies
            context.state.config_records[SUM_STATE] = ConfigRecord({"min-replies": need})
            _enough(len(configs.get(Key.SOURCE_LIST, [])) + 1, need, "in this secure sum")
        if stage == Stage.UNMASK:
            need = int((context.state.config_records.get(SUM_STATE) or {}).get("min-replies", 0))
            _enough(len(configs.get(Key.ACTIVE_NODE_ID_LIST, [])), need, "left in this secure sum")
        return secaggplus_mod(msg, context, legacy)

    return mod


secure_aggregation_mod = secagg_mod_for(lambda context: MerchantClient(context).to_client())
