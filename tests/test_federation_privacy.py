"""Federation privacy mode in Flower's simulation engine: the real ServerApp and ClientApps on a tiny BERT.

Each round is one DP-SGD step over every merchant's users: the merchants'
noise shares must sum to the central noise, the sum must be the plain sum of
what they sent, the step must be accounted once (and in every ledger), and a
round short of its merchants must be abandoned, never applied.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.clientapp import ClientApp
from flwr.common import ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from opacus.accountants import create_accountant

import client.app as merchant_app
from client.ledger import PrivacyLedger
from client.merchant import merchant_for_node
from client.node_config import NodeConfig
from client.secagg import MerchantClient, secagg_mod_for
from common import accounting, distributed_dp
from common.errors import SecureAggregationError, SilorecError
from common.messages import SumSpec
from common.round import RoundConfig
from server import checkpoint
from server.federation import check_settings
from server.optimizer import GlobalOptimizer
from server.settings import ServerSettings
from simulations.federated import SimulationSpec, run_simulation
from simulations.synthetic import SyntheticSpec, make_synthetic_silo


def _settings(
    tiny_bert: Path, out: Path, *, rounds: int, no_dp: bool = False, batch: int = 30, **server
) -> ServerSettings:
    cfg = RoundConfig(base_model=str(tiny_bert), batch_size=batch, no_dp=no_dp, delta=1e-3, threads=1)
    return ServerSettings(rounds=rounds, out_dir=str(out), eval_every=rounds, round=cfg, **server)


class RecordingClient(MerchantClient):
    """The real merchant client, which also leaves each gradient share and the signal it came from for the test."""

    def fit(self, parameters, config):
        seen = {}
        encode = distributed_dp.encode

        def spy(signal, lattice, noise_std, *, rng=None):
            seen.update(signal=signal, std=noise_std, step=lattice.step)
            return encode(signal, lattice, noise_std, rng=rng)

        distributed_dp.encode = spy
        try:
            arrays, weight, metrics = super().fit(parameters, config)
        finally:
            distributed_dp.encode = encode
        cfg, spec = RoundConfig.from_record(config), SumSpec.from_config(config)
        if spec.task == "gradient":
            folder = Path(cfg.silos_dir).parent / "shares"
            folder.mkdir(exist_ok=True)
            np.savez(
                folder / f"round-{cfg.round}-node-{self.context.node_id}.npz",
                std=seen["std"],
                step=seen["step"],
                **{f"signal-{n}": seen["signal"][n] for n in spec.names},
                **{f"share-{n}": a for n, a in zip(spec.names, arrays)},
            )
        return arrays, weight, metrics


class FaultyClient(MerchantClient):
    """Partition 0 drops out of round 2's sum; partition 1 has a smaller budget (node config `budget`)."""

    def fit(self, parameters, config):
        cfg, spec = RoundConfig.from_record(config), SumSpec.from_config(config)
        if spec.task == "gradient" and cfg.round == 2 and int(self.context.node_config["partition-id"]) == 0:
            raise SecureAggregationError("partition 0 drops out of round 2")
        return super().fit(parameters, config)


class ThriftyClient(MerchantClient):
    """Partition 1's budget (node config `budget`) pays for the releases and one step of the announced noise, no more."""

    def fit(self, parameters, config):
        cfg, spec = RoundConfig.from_record(config), SumSpec.from_config(config)
        if spec.task == "gradient" and int(self.context.node_config["partition-id"]) == 1:
            ledger = PrivacyLedger.open(
                merchant_for_node(NodeConfig.parse(self.context.node_config), cfg).state_dir,
                budget=8.0,
                delta=cfg.delta,
            )
            releases = [(e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.entries if e.what != "train"]
            budget = accounting.epsilon([*releases, (spec.noise_multiplier, spec.sample_rate, 1)], cfg.delta) + 1e-6
            self.context.node_config["budget"] = str(budget)
        return super().fit(parameters, config)


class ForgetfulClient(MerchantClient):
    """Partition 0 loses its whole ledger (both files) before round 2, as a reset or a lost disk would."""

    def fit(self, parameters, config):
        cfg, spec = RoundConfig.from_record(config), SumSpec.from_config(config)
        if spec.task == "gradient" and cfg.round == 2 and int(self.context.node_config["partition-id"]) == 0:
            state = merchant_for_node(NodeConfig.parse(self.context.node_config), cfg).state_dir
            for name in ("ledger.json", "ledger.seen"):
                (state / name).unlink()
        return super().fit(parameters, config)


def oversize_mod(msg, context, call_next):
    """Partition 0 answers round 2's collect stage with its last masked tensor 4 million words long (32 MB)."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)  # read first: SecAgg+'s mod consumes it
    collect = configs is not None and configs.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS
    reply = call_next(msg, context)
    if (
        collect
        and msg.metadata.group_id == "2"
        and int(context.node_config["partition-id"]) == 0
        and not reply.has_error()
    ):
        out = reply.content.config_records[RECORD_KEY_CONFIGS]
        vector = list(out[Key.MASKED_PARAMETERS])
        out[Key.MASKED_PARAMETERS] = vector[:-1] + [ndarray_to_bytes(np.ones(4_000_000, np.int64))]
    return reply


def _app(client_cls, *outer) -> ClientApp:
    app = ClientApp(mods=[*outer, secagg_mod_for(lambda context: client_cls(context).to_client())])
    app.train()(merchant_app.train)  # Flower asks for one; a secure sum's messages never reach it
    app.evaluate()(merchant_app.evaluate)
    app.query()(merchant_app.query)
    return app


recording = _app(RecordingClient)
faulty = _app(FaultyClient)
thrifty = _app(ThriftyClient)
forgetful = _app(ForgetfulClient)
oversized = _app(MerchantClient, oversize_mod)


@pytest.fixture
def steps(monkeypatch):
    """Every optimiser step the coordinator takes: the gradient sum it was given, and the adapter before and after."""
    taken = []
    real = GlobalOptimizer.step

    def spy(self, arrays, total, expected_batch):
        after = real(self, arrays, total, expected_batch)
        taken.append({"before": dict(arrays), "total": dict(total), "after": after, "expected_batch": expected_batch})
        return after

    monkeypatch.setattr(GlobalOptimizer, "step", spy)
    return taken


def test_noise_shares_sum_to_the_central_noise_and_each_step_is_accounted_once(tmp_path, tiny_bert, steps):
    data = make_synthetic_silo(tmp_path / "data", SyntheticSpec(users=90, seed=4))
    out = tmp_path / "run"
    m = run_simulation(
        SimulationSpec(data=data, out=out, merchants=3), _settings(tiny_bert, out, rounds=3), client_app=recording
    )
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    plan = lines[0]["plan"]
    sigma, q, names = plan["noise_multiplier"], plan["sample_rate"], plan["names"]
    assert plan["users"] == 90 and plan["min_replies"] == 3 and q == pytest.approx(30 / 90) and len(steps) == 3
    noise, expected = [], []
    for rnd, taken in enumerate(steps, start=1):
        files = [dict(np.load(f)) for f in sorted((out / "shares").glob(f"round-{rnd}-*.npz"))]
        assert len(files) == 3 and taken["expected_batch"] == pytest.approx(30.0)
        step = float(files[0]["step"])
        dim = sum(files[0][f"signal-{n}"].size for n in names)
        for n in names:
            # the coordinator's sum is exactly the merchants' shares added up, and nothing else
            assert np.array_equal(taken["total"][n], np.rint(sum(f[f"share-{n}"] for f in files)) * step)
            noise.append(taken["total"][n] - sum(f[f"signal-{n}"] for f in files))
        # each share carries σ·(C/Δ + √d)/√3 lattice units of noise, so the three carry σ·(C + √d·Δ) in all
        assert all(float(f["std"]) == pytest.approx(sigma * (1 / step + math.sqrt(dim)) / math.sqrt(3)) for f in files)
        expected.append(sigma * (1.0 + math.sqrt(dim) * step))
    noise = np.concatenate([n.ravel() for n in noise])
    central = float(np.mean(expected))
    print(f"noise of the secure sum: std {noise.std():.4f} over {noise.size} coordinates; central σ·C {central:.4f}")
    assert (
        noise.size > 5000
        and noise.std() == pytest.approx(central, rel=0.06)
        and abs(noise.mean()) < 5 * central / math.sqrt(noise.size)
    )

    # one accountant: the federation's ε is central DP-SGD's for the same releases and steps, and every ledger says so
    central_dp = create_accountant("prv")
    central_dp.history = [tuple(e) for e in plan["releases"]]
    for _ in range(3):
        central_dp.step(noise_multiplier=sigma, sample_rate=q)
    with np.errstate(divide="ignore"):
        eps = central_dp.get_epsilon(delta=1e-3)
    assert m["privacy"]["epsilon"] == pytest.approx(eps, rel=1e-6) and 7.0 < eps <= 8.0 and m["privacy"]["steps"] == 3
    for silo in (p for p in (out / "silos").iterdir() if p.is_dir()):
        ledger = PrivacyLedger.open(silo / ".silorec-state", budget=8.0, delta=1e-3)
        assert [e.what for e in ledger.entries] == ["popularity", "cooccurrence", "train", "train", "train"]
        assert ledger.spent() == pytest.approx(eps, rel=1e-6)
    assert len(lines[3]["epsilon"]) == 3 and all(
        e == pytest.approx(eps, rel=1e-6) for e in lines[3]["epsilon"].values()
    )
    assert (out / "adapter" / "README.md").read_text().count("Privacy of the federation") == 1


def test_without_noise_the_secure_sum_is_the_plain_sum_within_the_rounding(tmp_path, tiny_bert, steps):
    data = make_synthetic_silo(tmp_path / "data", SyntheticSpec(users=60, seed=6))
    out = tmp_path / "run"
    run_simulation(
        SimulationSpec(data=data, out=out, merchants=2),
        _settings(tiny_bert, out, rounds=2, no_dp=True, batch=20),
        client_app=recording,
    )
    lattice = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["plan"]["lattice"]
    worst, scale = 0.0, 0.0
    for rnd, taken in enumerate(steps, start=1):
        files = [dict(np.load(f)) for f in sorted((out / "shares").glob(f"round-{rnd}-*.npz"))]
        for n, total in taken["total"].items():
            plain = sum(f[f"signal-{n}"] for f in files)
            worst, scale = max(worst, float(np.abs(total - plain).max())), max(scale, float(np.abs(plain).max()))
    bound = 2 * lattice["step"]  # stochastic rounding: under one step per merchant and coordinate
    print(f"secure sum vs plain sum: max abs diff {worst:.3g} (bound {bound:.3g}; sum max abs {scale:.3g})")
    assert worst <= bound and scale > 1e4 * bound


def test_a_dropout_is_recovered_above_min_replies_and_a_round_below_it_is_abandoned(tmp_path, tiny_bert, steps):
    data = make_synthetic_silo(tmp_path / "data", SyntheticSpec(users=90, seed=7))
    out = tmp_path / "recovered"
    # m_min 2 of 3: partition 0 drops out of round 2, which goes on with the other two
    run_simulation(
        SimulationSpec(data=data, out=out, merchants=3),
        _settings(tiny_bert, out, rounds=2, min_replies=2),
        client_app=faulty,
    )
    line = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][2]
    assert "abandoned" not in line and line["accepted"] == 2 and len(steps) == 2
    assert any("drops out of round 2" in r["reason"] for r in line["rejected"])

    steps.clear()
    out = tmp_path / "abandoned"
    run_simulation(
        SimulationSpec(data=data, out=out, merchants=3),
        _settings(tiny_bert, out, rounds=3, min_replies=3),
        client_app=faulty,
    )
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "abandoned" in lines[2] and "abandoned" not in lines[1] and "abandoned" not in lines[3]
    # round 2 moved nothing: round 3 started from round 1's adapter, and the run ended on round 3's step
    assert len(steps) == 2
    assert all(np.array_equal(steps[1]["before"][k], v) for k, v in steps[0]["after"].items())
    final = checkpoint.load(out / "checkpoint").global_arrays
    assert all(np.array_equal(final[k], v) for k, v in steps[1]["after"].items())


def test_a_reply_past_the_size_bound_is_refused_before_the_sum_and_the_round_goes_on(tmp_path, tiny_bert, steps):
    data = make_synthetic_silo(tmp_path / "data", SyntheticSpec(users=90, seed=10))
    out = tmp_path / "run"
    m = run_simulation(
        SimulationSpec(data=data, out=out, merchants=3),
        _settings(tiny_bert, out, rounds=3, min_replies=2),
        client_app=oversized,
    )
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["accepted"] for line in lines[1:]] == [3, 2, 3] and len(steps) == 3
    (refused,) = [r["reason"] for r in lines[2]["rejected"] if "refused before the sum" in r["reason"]]
    print(f"round 2, refused: {refused}")
    assert "past the bound" in refused and "32,0" in refused
    # the other two were unmasked as if partition 0 had dropped out: the step is finite and moved the adapter
    assert all(np.isfinite(v).all() for v in steps[1]["total"].values())
    assert m["rounds"] == 3


def test_a_merchant_refuses_a_round_its_budget_cannot_pay_for(tmp_path, tiny_bert, steps):
    data = make_synthetic_silo(tmp_path / "data", SyntheticSpec(users=90, seed=8))
    out = tmp_path / "run"
    m = run_simulation(
        SimulationSpec(data=data, out=out, merchants=3),
        _settings(tiny_bert, out, rounds=2, min_replies=2),
        client_app=thrifty,
    )
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["accepted"] == 3 and lines[2]["accepted"] == 2 and len(steps) == 2
    (refused,) = [r["reason"] for r in lines[2]["rejected"]]
    assert "refuses the round" in refused and "would take it to" in refused
    silo = next(p for p in sorted((out / "silos").iterdir()) if p.is_dir() and p.name in refused)
    ledger = PrivacyLedger.open(silo / ".silorec-state", budget=8.0, delta=1e-3)
    assert [e.what for e in ledger.entries] == [
        "popularity",
        "cooccurrence",
        "train",
    ]  # the refused step was never recorded
    assert m["rounds"] == 2


def test_a_merchant_whose_ledger_reports_less_than_it_was_asked_to_spend_is_flagged(tmp_path, tiny_bert):
    data = make_synthetic_silo(tmp_path / "data", SyntheticSpec(users=60, seed=9))
    out = tmp_path / "run"
    run_simulation(
        SimulationSpec(data=data, out=out, merchants=2),
        _settings(tiny_bert, out, rounds=2, batch=20),
        client_app=forgetful,
    )
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "ledger_flags" not in lines[1]
    (flag,) = lines[2]["ledger_flags"]
    assert flag["reported"] < flag["asked"] and flag["asked"] == pytest.approx(lines[2]["epsilon_federation"])


def test_settings_that_federation_mode_cannot_honour_are_refused_before_anything_starts():
    fed = ServerSettings()
    for bad, match in (
        (replace(fed, aggregation="median"), "only fedavg"),
        (replace(fed, round=replace(fed.round, local_head="bias")), "local-head"),
        (replace(fed, min_replies=1), "min-replies"),
    ):
        with pytest.raises(SilorecError, match=match):
            check_settings(bad)
    check_settings(replace(fed, round=RoundConfig.for_mode("silo", local_head="full"), aggregation="median"))


def test_a_release_that_announces_less_than_a_users_whole_contribution_is_refused(tmp_path, tiny_bert, synthetic_silo):
    from client.merchant import Merchant
    from common.distributed_dp import plan
    from common.popularity import text_keys
    from common.text import item_texts

    merchant = Merchant(synthetic_silo, tmp_path / "state", RoundConfig(base_model=str(tiny_bert)).model())
    cfg = RoundConfig(base_model=str(tiny_bert), epsilon=8.0, delta=1e-3, run_id="r", round=0)
    keys = np.unique(text_keys(item_texts(merchant.silo.items)))
    lattice = plan(bound=100.0, noise_multiplier=2.0, clip=1.0, dim=len(keys), min_replies=2, merchants=2)
    for clip, rate in ((1e-3, 1.0), (1.0, 0.01)):  # less noise than one user needs, or a ledger told of a sample
        with pytest.raises(SecureAggregationError, match="refusing it"):
            merchant.release_share(cfg, SumSpec("popularity", ("counts",), 2.0, rate, 2, clip, lattice), keys)
    assert not (tmp_path / "state" / "ledger.json").exists()  # nothing spent
    (share,), metrics = merchant.release_share(cfg, SumSpec("popularity", ("counts",), 2.0, 1.0, 2, 1.0, lattice), keys)
    assert share.shape == keys.shape and metrics["epsilon-total"] > 0
