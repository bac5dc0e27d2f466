"""silorec ClientApp: a merchant's side of each round (Flower Message API).

The node's settings come from its node config (`client.node_config`), the
round's from the message. In a deployment every message starts a fresh
ClientApp process, so this module imports the model (torch, transformers,
peft, Opacus: about ten seconds) only in the handlers that need one; the key
query and SecAgg+'s setup, key-sharing and unmasking stages never do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.node_config import NodeConfig
from client.outgoing import record_outgoing_mod
from client.sealing import global_arrays, key_record, merchant_key, seal_update, signing_key
from client.secagg import secure_aggregation_mod
from common import seal
from common.messages import (
    ASK_CENSUS,
    ASK_TABLE,
    CENSUS_KIND,
    POOL_RECORD,
    TABLE_KIND,
    USE_NEIGHBOURS,
    USE_POOLED,
)

if TYPE_CHECKING:
    from client.merchant import Merchant, TrainOutcome
    from common.round import RoundConfig

# SecAgg+ messages go to Flower's secaggplus_mod, all others pass through; outermost, what leaves is
# recorded as sent where the merchant asks for it (client.outgoing)
app = ClientApp(mods=[record_outgoing_mod, secure_aggregation_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    return train_reply(msg, context, *train_locally(msg, context))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from common.round import RoundConfig

    cfg = RoundConfig.from_record(msg.content["config"])
    merchant = _merchant(NodeConfig.parse(context.node_config), cfg)
    metrics = merchant.evaluate(global_arrays(msg, cfg, context.node_id, merchant_key(merchant.state_dir)), cfg)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics), "info": _info(merchant)}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The merchant's public key, so the coordinator can seal the global adapter to it; its census
    (federation mode); or, asked to pool popularity, its released item counts keyed by item text;
    then the pooled counts or co-occurrence to score with."""
    node = NodeConfig.parse(context.node_config)
    ask = msg.content.config_records.get(POOL_RECORD)
    if ask is None:
        state = node.state(str(msg.content["config"].get("silos_dir", "")))
        return Message(content=RecordDict({seal.KEY_RECORD: key_record(merchant_key(state))}), reply_to=msg)
    from common.round import RoundConfig

    cfg = RoundConfig.from_record(msg.content["config"])
    merchant = _merchant(node, cfg)
    if ask["ask"] == ASK_TABLE:
        node.check_privacy(cfg.private, "a popularity release")
        table, reason = merchant.popularity_table(cfg, budget=node.budget)
        return _sealed_reply(msg, context, node, merchant, table, reason, kind=TABLE_KIND)
    if ask["ask"] == ASK_CENSUS:
        return _sealed_reply(msg, context, node, merchant, merchant.census(), "", kind=CENSUS_KIND)
    if ask["ask"] in (USE_POOLED, USE_NEIGHBOURS):
        arrays = global_arrays(msg, cfg, context.node_id, merchant_key(merchant.state_dir))
        (merchant.use_pooled_popularity if ask["ask"] == USE_POOLED else merchant.use_pooled_neighbours)(arrays)
        return Message(content=RecordDict({"info": _info(merchant)}), reply_to=msg)
    raise ValueError(f"unknown query: {ask['ask']!r}")


def train_locally(msg: Message, context: Context) -> tuple[NodeConfig, Merchant, TrainOutcome]:
    """Train this merchant's silo from the global adapter in `msg` (the update is still in the clear)."""
    from common.round import RoundConfig

    cfg = RoundConfig.from_record(msg.content["config"])
    node = NodeConfig.parse(context.node_config)
    node.check_privacy(cfg.private, "a training round")
    merchant = _merchant(node, cfg)
    arrays = global_arrays(msg, cfg, context.node_id, merchant_key(merchant.state_dir))
    return node, merchant, merchant.train_round(arrays, cfg, budget=node.budget)


def train_reply(msg: Message, context: Context, node: NodeConfig, merchant: Merchant, outcome: TrainOutcome) -> Message:
    """The reply: metrics, and the update sealed to the run's key (in the clear only if the server asked no sealing)."""
    return _sealed_reply(msg, context, node, merchant, outcome.update, outcome.reason, metrics=outcome.metrics)


def _sealed_reply(
    msg: Message,
    context: Context,
    node: NodeConfig,
    merchant: Merchant,
    arrays: dict | None,
    reason: str,
    *,
    metrics: dict[str, float] | None = None,
    kind: str = "train-update",
) -> Message:
    """`arrays` sealed to the run's key in `msg` (in the clear only if it sent none), or just why there are none."""
    from common.arrays import to_record
    from common.round import RoundConfig

    metrics = dict(metrics or {})
    content = RecordDict({"info": _info(merchant, reason)})
    if arrays is not None:
        if seal.KEY_RECORD in msg.content.config_records:
            cfg = RoundConfig.from_record(msg.content["config"])
            records, metrics["seal-seconds"] = seal_update(
                arrays,
                msg,
                cfg,
                context.node_id,
                signing_key(node.signing_key),
                kind=kind,
            )
            for name, record in records.items():
                content[name] = record
        else:
            content["update"] = to_record(arrays)
    content["metrics"] = MetricRecord(metrics)
    return Message(content=content, reply_to=msg)


def _merchant(node: NodeConfig, cfg: RoundConfig) -> Merchant:
    """This node's Merchant (`client.merchant.merchant_for_node`), imported only by the handlers that need a model."""
    from client.merchant import merchant_for_node

    return merchant_for_node(node, cfg)


def _info(merchant: Merchant, reason: str = "") -> ConfigRecord:
    return ConfigRecord({"silo": merchant.silo.name, "reason": reason})
