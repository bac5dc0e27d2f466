"""silorec ClientApp: a merchant's side of each round (Flower Message API).

Node config (set by the SuperNode, e.g. `silorec-client start`):
  data-path   the silo folder (in simulation: partition-id picks one under the run's silos)
  state-path  where the ledger and local head live (default: <data-path>/.silorec-state)
  cache-path  cache of item vectors (default: <state-path>/cache; in simulation one shared by all silos)
  budget      this merchant's ε budget (default: the run's epsilon)
  signing-key the merchant's enrolled Ed25519 key (NAME.sign.key); its updates are then signed
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.merchant import Merchant, TrainOutcome, merchant_for_node, silo_path, state_path
from client.secagg import secure_aggregation_mod
from client.sealing import global_arrays, key_record, merchant_key, seal_update, signing_key
from common import seal
from common.arrays import to_record
from common.round import (
    ASK_CENSUS, ASK_TABLE, CENSUS_KIND, POOL_RECORD, TABLE_KIND, USE_NEIGHBOURS, USE_POOLED, RoundConfig,
)

app = ClientApp(mods=[secure_aggregation_mod])  # SecAgg+ messages go to Flower's secaggplus_mod, all others pass through


@app.train()
def train(msg: Message, context: Context) -> Message:
    return train_reply(msg, context, *train_locally(msg, context))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = RoundConfig.from_record(msg.content["config"])
    merchant = merchant_from_context(context, cfg)
    metrics = merchant.evaluate(global_arrays(msg, cfg, context.node_id, merchant_key(merchant.state_dir)), cfg)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics), "info": _info(merchant)}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The merchant's public key, so the coordinator can seal the global adapter to it; its census
    (federation mode); or, asked to pool popularity, its released item counts keyed by item text;
    then the pooled counts or co-occurrence to score with."""
    cfg = RoundConfig.from_record(msg.content["config"])
    ask = msg.content.config_records.get(POOL_RECORD)
    if ask is None:
        state = state_path(context.node_config, silo_path(context.node_config, cfg))
        return Message(content=RecordDict({seal.KEY_RECORD: key_record(merchant_key(state))}), reply_to=msg)
    merchant = merchant_from_context(context, cfg)
    if ask["ask"] == ASK_TABLE:
        budget = context.node_config.get("budget")
        table, reason = merchant.popularity_table(cfg, budget=float(budget) if budget else None)
        return _sealed_reply(msg, context, merchant, table, reason, kind=TABLE_KIND)
    if ask["ask"] == ASK_CENSUS:
        return _sealed_reply(msg, context, merchant, merchant.census(), "", kind=CENSUS_KIND)
    if ask["ask"] in (USE_POOLED, USE_NEIGHBOURS):
        arrays = global_arrays(msg, cfg, context.node_id, merchant_key(merchant.state_dir))
        (merchant.use_pooled_popularity if ask["ask"] == USE_POOLED else merchant.use_pooled_neighbours)(arrays)
        return Message(content=RecordDict({"info": _info(merchant)}), reply_to=msg)
    raise ValueError(f"unknown query: {ask['ask']!r}")


def train_locally(msg: Message, context: Context) -> tuple[Merchant, TrainOutcome]:
    """Train this merchant's silo from the global adapter in `msg` (the update is still in the clear)."""
    cfg = RoundConfig.from_record(msg.content["config"])
    merchant = merchant_from_context(context, cfg)
    budget = context.node_config.get("budget")
    arrays = global_arrays(msg, cfg, context.node_id, merchant_key(merchant.state_dir))
    return merchant, merchant.train_round(arrays, cfg, budget=float(budget) if budget else None)


def train_reply(msg: Message, context: Context, merchant: Merchant, outcome: TrainOutcome) -> Message:
    """The reply: metrics, and the update sealed to the run's key (in the clear only if the server asked no sealing)."""
    return _sealed_reply(msg, context, merchant, outcome.update, outcome.reason, metrics=outcome.metrics)


def _sealed_reply(
    msg: Message, context: Context, merchant: Merchant, arrays: dict | None, reason: str,
    *, metrics: dict[str, float] | None = None, kind: str = "train-update",
) -> Message:
    """`arrays` sealed to the run's key in `msg` (in the clear only if it sent none), or just why there are none."""
    metrics = dict(metrics or {})
    content = RecordDict({"info": _info(merchant, reason)})
    if arrays is not None:
        if seal.KEY_RECORD in msg.content.config_records:
            cfg = RoundConfig.from_record(msg.content["config"])
            records, metrics["seal-seconds"] = seal_update(
                arrays, msg, cfg, context.node_id, signing_key(context.node_config.get("signing-key")), kind=kind
            )
            for name, record in records.items():
                content[name] = record
        else:
            content["update"] = to_record(arrays)
    content["metrics"] = MetricRecord(metrics)
    return Message(content=content, reply_to=msg)


def merchant_from_context(context: Context, cfg: RoundConfig) -> Merchant:
    """This node's Merchant, from its node config and the round's config."""
    return merchant_for_node(context.node_config, cfg)


def _info(merchant: Merchant, reason: str = "") -> ConfigRecord:
    return ConfigRecord({"silo": merchant.silo.name, "reason": reason})
