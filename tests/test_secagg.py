"""Secure aggregation (SecAgg+) runs in Flower's simulation engine, checked against plain FedAvg of the same updates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.clientapp import ClientApp

import client.app as merchant_app
from client.merchant import merchant_for_node
from client.node_config import NodeConfig
from client.secagg import MerchantClient, clip_norm, secagg_mod_for, secure_aggregation_mod
from common.errors import SilorecError
from common.messages import SumSpec
from common.round import RoundConfig
from server import checkpoint
from server.secagg import check, quantization_range
from server.settings import ServerSettings
from server.updates import aggregate
from simulations.federated import SimulationSpec, run_simulation
from simulations.synthetic import SyntheticSpec, make_synthetic_silo


class RecordingClient(MerchantClient):
    """The real merchant client, which also leaves its plaintext update where the test can read it."""

    def fit(self, parameters, config):
        arrays, users, metrics = super().fit(parameters, config)
        cfg = RoundConfig.from_record(config)
        folder = Path(cfg.silos_dir).parent / "plaintext"
        folder.mkdir(exist_ok=True)
        names = SumSpec.from_config(config).names
        merchant = merchant_for_node(NodeConfig.parse(self.context.node_config), cfg)
        start = {n: a for n, a in self._sealed(merchant, parameters, config, cfg).items() if n in names}
        np.savez(
            folder / f"round-{cfg.round}-node-{self.context.node_id}.npz",
            users=users,
            **{f"update-{i}": a for i, a in enumerate(arrays)},
            **{f"global-{n}": p for n, p in start.items()},
        )
        return arrays, users, metrics


recording = ClientApp(mods=[secagg_mod_for(lambda context: RecordingClient(context).to_client())])


@recording.train()
def _train(msg, context):  # a Message-API train message: a run with secure aggregation sends none
    return merchant_app.train(msg, context)


@recording.evaluate()
def _evaluate(msg, context):
    return merchant_app.evaluate(msg, context)


recording.query()(merchant_app.query)  # the coordinator asks each merchant for its sealing key


# What client/app.py's ClientApp becomes with secure aggregation: the same functions, one mod more.
merchant = ClientApp(mods=[secure_aggregation_mod])
merchant.train()(merchant_app.train)
merchant.evaluate()(merchant_app.evaluate)
merchant.query()(merchant_app.query)


def _settings(tiny_bert: Path, out: Path, *, rounds: int, epsilon: float = 8.0, no_dp: bool = False) -> ServerSettings:
    cfg = RoundConfig.for_mode(
        "silo",
        base_model=str(tiny_bert),
        local_epochs=1,
        batch_size=16,
        epsilon=epsilon,
        no_dp=no_dp,
        delta=1e-3,
        threads=1,
    )
    return ServerSettings(rounds=rounds, out_dir=str(out), secure_aggregation=True, round=cfg)


def test_secagg_aggregate_matches_users_weighted_fedavg_of_the_same_updates(tmp_path, tiny_bert):
    data = make_synthetic_silo(tmp_path / "data", SyntheticSpec(users=90, seed=4))
    out = tmp_path / "run"
    m = run_simulation(
        SimulationSpec(data=data, out=out, merchants=3),
        _settings(tiny_bert, out, rounds=2, no_dp=True),
        client_app=recording,
    )
    assert m["secure_aggregation"] and m["rounds"] == 2 and (out / "adapter" / "adapter_model.safetensors").is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2] and all(line["accepted"] == 3 for line in lines[1:])

    plain = out / "plaintext"
    start = dict(np.load(next(plain.glob("round-1-*.npz"))))
    start = {k.removeprefix("global-"): v for k, v in start.items() if k.startswith("global-")}
    names = sorted(start)
    tol = 0.0
    expected = {k: np.zeros_like(v, dtype=np.float64) for k, v in start.items()}
    unweighted = {k: np.zeros_like(v, dtype=np.float64) for k, v in start.items()}
    for rnd in (1, 2):
        files = [dict(np.load(f)) for f in sorted(plain.glob(f"round-{rnd}-*.npz"))]
        assert len(files) == 3
        updates = [{n: f[f"update-{i}"] for i, n in enumerate(names)} for f in files]
        users = [float(f["users"]) for f in files]
        assert len(set(users)) > 1, "merchants of equal size cannot tell weighted from unweighted averaging"
        sa = lines[rnd]["secagg"]  # stochastic rounding: under one step 2c/Q per merchant, over the weights' sum
        tol += len(users) * 2 * sa["clipping_range"] / sa["quantization_range"] / (sum(users) / sa["max_weight"])
        for k, v in aggregate(updates, users, "fedavg").items():
            expected[k] += v
        for k, v in aggregate(updates, [1.0] * 3, "fedavg").items():
            unweighted[k] += v
    final = checkpoint.load(out / "checkpoint").global_arrays
    applied = {k: final[k].astype(np.float64) - start[k] for k in names}
    err = max(float(np.abs(applied[k] - expected[k]).max()) for k in names)
    wrong = max(float(np.abs(applied[k] - unweighted[k]).max()) for k in names)
    scale = max(float(np.abs(expected[k]).max()) for k in names)
    tol += 2 * 2.0**-24 * max(float(np.abs(final[k]).max()) for k in names)  # the global adapter is stored in float32
    print(
        f"SecAgg+ vs FedAvg: max abs diff {err:.3g} (bound {tol:.3g}, update max abs {scale:.3g}); "
        f"an unweighted mean would differ by {wrong:.3g}"
    )
    assert err < tol
    assert wrong > 10 * tol and scale > 100 * tol  # the check can tell a wrong aggregate from a right one


def test_dp_merchants_report_epsilon_through_secagg(tmp_path, tiny_bert):
    data = make_synthetic_silo(tmp_path / "data", SyntheticSpec(users=60, seed=5))
    out = tmp_path / "run"
    m = run_simulation(
        SimulationSpec(data=data, out=out, merchants=3),
        _settings(tiny_bert, out, rounds=1, epsilon=8.0),
        client_app=merchant,
    )
    line = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1]
    assert line["accepted"] == 3 and len(line["epsilon"]) == 3
    assert all(0 < eps <= 8.0 for eps in line["epsilon"].values())
    assert 0 < m["epsilon_max"] <= 8.0 and all(x["epsilon-total"] is not None for x in m["merchants"])


def test_settings_that_secagg_cannot_honour_are_refused_with_what_to_do():
    with pytest.raises(SilorecError, match="only fedavg"):
        check(ServerSettings(secure_aggregation=True, aggregation="median"))
    with pytest.raises(SilorecError, match="min-fit-clients"):
        check(ServerSettings(secure_aggregation=True, min_fit_clients=1))


def test_quantization_range_leaves_room_for_every_merchants_values_and_weights():
    for n in (2, 3, 11, 100):
        q = quantization_range(n)
        assert q & (q - 1) == 0 and 2 * (n + 1) * q <= 2**32 < 4 * (n + 1) * q


def test_clip_norm_bounds_the_update_and_keeps_small_ones():
    update = {"a": np.full(4, 3.0, np.float32), "b": np.full(2, 4.0, np.float32)}
    clipped = clip_norm(update, 1.0)
    norm = np.sqrt(sum(np.square(v).sum() for v in clipped.values()))
    assert abs(norm - 1.0) < 1e-6 and clipped["a"].dtype == np.float32
    assert clip_norm(update, 100.0) is update


def test_unmasking_needs_more_shares_than_the_merchants_that_may_collude():
    from server.secagg import reconstruction_threshold

    assert reconstruction_threshold(11, 11) == 7  # SecAgg+'s two thirds when every merchant must reply
    assert reconstruction_threshold(12, 3) == 10  # 9 colluders must not reach an honest merchant's secrets
    assert all(reconstruction_threshold(n, m) > n - m for n in range(2, 30) for m in range(2, n + 1))
