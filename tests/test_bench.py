from __future__ import annotations

from click.testing import CliRunner

from simulations.bench import Measure, ratio, table


def test_ratio_and_table_compare_within_one_batch_size():
    ms = [
        Measure("non-dp", 8, "cpu", 100.0, 0.08, 600, 500),
        Measure("dp", 8, "cpu", 85.0, 0.094, 650, 500),
        Measure("non-dp", 16, "cpu", 150.0, 0.1, 700, 500),
        Measure("dp", 16, "cpu", 90.0, 0.18, 800, 500),
    ]
    assert ratio(ms, 8) == 0.85 and ratio(ms, 16) == 0.6
    rows = table(ms).splitlines()
    assert rows[2].split()[-1] == "0.85" and rows[2].split()[-2] == "150"  # step MB: peak − setup


def test_bench_measures_every_step_in_its_own_process(tiny_bert, synthetic_silo, tmp_path):
    import json

    from simulations.cli import main as sim

    out = tmp_path / "bench.json"
    args = ["bench", "--data", str(synthetic_silo), "--base-model", str(tiny_bert), "--batch-sizes", "4"]
    done = CliRunner().invoke(
        sim, [*args, "--steps", "1", "--device", "cpu", "--out", str(out), "--cache", str(tmp_path)]
    )
    assert done.exit_code == 0, done.output
    assert done.output.strip().splitlines()[-1].startswith("DP/non-DP throughput ratio: ")
    measures = json.loads(out.read_text())["measures"]
    assert [(m["mode"], m["batch"]) for m in measures] == [
        ("non-dp", 4),
        ("dp", 4),
        ("ghost", 4),
    ]
    assert all(m["users_per_second"] > 0 and m["peak_mb"] >= m["setup_mb"] > 0 for m in measures)
    bad = CliRunner().invoke(sim, [*args, "--modes", "dp"])
    assert bad.exit_code == 2 and "non-dp" in bad.output


def test_the_ghost_step_sums_each_users_flat_clipped_gradient(tiny_bert, synthetic_silo):
    """What the bench times as ghost clipping is DP-SGD's clipped sum: checked against per-user gradients."""
    import torch
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    from common.model_config import ModelConfig
    from common.recommender import build_recommender
    from common.records import UserRecords
    from common.silo import load_silo
    from common.split import leave_one_out
    from common.text import item_texts
    from common.train import batch_loss, mask_history, next_items_loss

    silo = load_silo(synthetic_silo)
    model = build_recommender(
        ModelConfig(base_model=str(tiny_bert), local_head="bias"), list(silo.items["item_id"]), item_texts(silo.items)
    )
    with torch.no_grad():  # LoRA B starts at zero, which leaves A without gradient: give both some
        for name, p in model.user_tower.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    records = UserRecords(leave_one_out(silo.interactions, silo.n_items), seed=0, next_items=3)
    batch = [records[i] for i in range(5)]
    params = [p for p in model.parameters() if p.requires_grad]
    clip = 0.05

    reference = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    batch_loss(reference, model, batch).backward()
    per_user = torch.cat([p.grad_sample.reshape(len(batch), -1) for p in params], dim=1)
    factors = (clip / per_user.norm(dim=1)).clamp(max=1.0)
    assert (factors < 1).all()  # the bound binds for every user
    expected = (factors[:, None] * per_user).sum(0)
    reference._close()
    for p in params:
        p.grad = None

    net = GradSampleModuleFastGradientClipping(
        model, batch_first=True, loss_reduction="mean", max_grad_norm=clip, use_ghost_clipping=True
    )
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(params, lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=5,
        loss_reduction="mean",
    )
    logits = net(**model.history_inputs([r.history for r in batch]))
    losses = next_items_loss(mask_history(logits.float(), batch), batch, per_record=True)
    DPTensorFastGradientClipping(net, optimizer, losses, "mean").backward()
    got = torch.cat([p.grad.reshape(-1) for p in params])
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-7)
