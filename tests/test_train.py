from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import GradSampleModule

from common import accounting
from common.metrics import evaluate, most_pop
from common.model_config import ModelConfig
from common.recommender import build_recommender
from common.records import UserRecords
from common.serve import scorer
from common.silo import load_silo
from common.split import leave_one_out
from common.text import item_texts
from common.train import (
    TrainConfig,
    clip_bounds,
    clipped_gradient_sum,
    dp_optimizer,
    mask_history,
    next_items_loss,
    train,
)
from simulations.synthetic import SyntheticSpec, make_synthetic_silo


def setup(path, tiny_bert, **model):
    s = load_silo(path)
    split = leave_one_out(s.interactions, s.n_items)
    cfg = ModelConfig(base_model=str(tiny_bert), **model)
    m = build_recommender(cfg, list(s.items["item_id"]), item_texts(s.items))
    return m, split


def batch_loss(net, model, records):
    inputs = model.history_inputs([r.history for r in records])
    return next_items_loss(mask_history(net(**inputs), records), records)


def perturb(model):
    with torch.no_grad():  # B and the head start at zero; make every gradient non-trivial
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


def test_per_user_gradients_are_exact(tiny_bert, synthetic_silo):
    torch.manual_seed(0)
    model, split = setup(synthetic_silo, tiny_bert)
    perturb(model)
    records = UserRecords(split, next_items=3).records()[:5]
    names = model.trainable_names()
    assert any("head" in n for n in names) and any("lora_A" in n for n in names)
    expected = []
    for r in records:  # each user's gradient, alone
        model.zero_grad()
        batch_loss(model, model, [r]).backward()
        expected.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    model.zero_grad()
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    batch_loss(gsm, model, records).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            for i in range(len(records)):
                torch.testing.assert_close(p.grad_sample[i], expected[i][n], rtol=1e-4, atol=1e-6)
    gsm._close()


def test_dp_step_clips_each_user_and_adds_noise(tiny_bert, synthetic_silo):
    torch.manual_seed(0)
    model, split = setup(synthetic_silo, tiny_bert)
    perturb(model)
    records = UserRecords(split, next_items=3).records()[:8]
    C = 1e-3  # far below the raw gradient norms, so clipping is active
    cfg = TrainConfig(max_grad_norm=C)
    bounds = clip_bounds(model, cfg)
    assert sum(b * b for b in bounds.values()) == pytest.approx(C * C)  # the groups share C², no more
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    opt = dp_optimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), cfg, 0.0, expected_batch_size=8)
    batch_loss(gsm, model, records).backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    raw = torch.stack([p.grad_sample.reshape(8, -1).norm(dim=1) for _, p in params], dim=1)
    assert (raw.norm(dim=1) > C).all()  # so the check below is not vacuous
    opt.clip_and_accumulate()
    clipped = []
    for j, (name, p) in enumerate(params):
        factor = (bounds[name] / (raw[:, j] + 1e-6)).clamp(max=1.0)
        per_user = p.grad_sample * factor.view(-1, *[1] * (p.grad_sample.dim() - 1))
        torch.testing.assert_close(p.summed_grad, per_user.sum(0), rtol=1e-4, atol=1e-9)
        clipped.append(per_user.reshape(8, -1).norm(dim=1))
    per_user_norm = torch.stack(clipped, dim=1).norm(dim=1)
    assert (per_user_norm <= C * (1 + 1e-4)).all()  # every user's whole gradient within max_grad_norm
    gsm._close()

    # now with noise: the released gradient differs from the clipped mean by N(0, (σC/B)²)
    torch.manual_seed(0)
    model2, _ = setup(synthetic_silo, tiny_bert)
    perturb(model2)
    sigma = 2.0
    gsm2 = GradSampleModule(model2, batch_first=True, loss_reduction="mean")
    opt2 = dp_optimizer(model2, torch.optim.SGD(model2.parameters(), lr=0.1), cfg, sigma, expected_batch_size=8)
    batch_loss(gsm2, model2, records).backward()
    opt2.pre_step()
    params2 = [p for p in model2.parameters() if p.requires_grad]
    noise = torch.cat([(p.grad - p.summed_grad / 8).flatten() for p in params2])
    assert noise.std().item() == pytest.approx(sigma * C / 8, rel=0.1)
    gsm2._close()


def test_dp_training_changes_every_trainable_tensor_and_reports_epsilon(tiny_bert, synthetic_silo):
    model, split = setup(synthetic_silo, tiny_bert)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cfg = TrainConfig(epochs=2, batch_size=16, epsilon=4.0, delta=1e-3)
    result = train(model, split, cfg, progress=False)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p.detach(), before[n]), f"{n} did not change"
    assert 3.0 < result.epsilon <= 4.0 + 1e-6
    assert result.noise_multiplier > 0 and result.steps == sum(s for _, _, s in result.accountant_history)
    assert result.epsilon == pytest.approx(accounting.epsilon(result.accountant_history, 1e-3))
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


def test_without_an_adapter_learning_rate_only_the_calibration_trains_and_takes_the_whole_bound(
    tiny_bert, synthetic_silo
):
    model, split = setup(synthetic_silo, tiny_bert)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    offset = model.calibration.offset.weight.detach().clone()
    train(
        model, split, TrainConfig(epochs=1, batch_size=16, lr=0.0, head_lr=0.1, epsilon=4.0, delta=1e-3), progress=False
    )
    assert all(torch.equal(p, lora[n]) for n, p in model.named_parameters() if "lora_" in n)
    assert not torch.equal(model.calibration.offset.weight, offset)
    assert sorted(model.shared_parameters()) == ["calibration.log_scale.weight", "calibration.offset.weight"]
    bounds = clip_bounds(model, TrainConfig(max_grad_norm=1.0))
    assert sum(b * b for b in bounds.values()) == pytest.approx(1.0) and all("lora_" not in n for n in bounds)


def test_clipped_gradient_sums_are_opacus_clipped_per_user_gradients_added_up(tiny_bert, synthetic_silo):
    model, split = setup(synthetic_silo, tiny_bert)
    perturb(model)
    records = UserRecords(split, seed=0, next_items=3).records()[:6]
    cfg = TrainConfig(max_grad_norm=0.5)
    total = clipped_gradient_sum(model, records, cfg)
    bounds = clip_bounds(model, cfg)
    by_param = {id(p): n for n, p in model.named_parameters()}
    shared = {id(p): n for n, p in model.shared_parameters().items()}
    expected = {}
    for r in records:  # each user alone, clipped per tensor to its bound, then summed
        model.zero_grad()
        batch_loss(model, model, [r]).backward()
        for p in model.parameters():
            if id(p) in shared:
                g = p.grad.detach().double()
                factor = min(1.0, bounds[by_param[id(p)]] / (float(g.norm()) + 1e-6))
                expected[shared[id(p)]] = expected.get(shared[id(p)], 0) + factor * g
    assert sorted(total) == sorted(expected)
    for n, g in expected.items():
        assert np.allclose(total[n], g.numpy(), atol=1e-5), n
    assert all(not np.any(v) for v in clipped_gradient_sum(model, [], cfg).values())  # an empty draw: zeros


def test_empty_poisson_batches_still_count_as_steps(tiny_bert, synthetic_silo):
    model, split = setup(synthetic_silo, tiny_bert)
    cfg = TrainConfig(epochs=1, batch_size=1, noise_multiplier=1.0, delta=1e-3)
    result = train(model, split, cfg, progress=False)
    users = len(UserRecords(split))
    assert result.steps == users and result.accountant_history == [(1.0, 1 / users, users)]


def test_training_is_deterministic_on_cpu_for_a_noise_seed_and_fresh_without(tiny_bert, synthetic_silo):
    def trained(noise_seed):
        model, split = setup(synthetic_silo, tiny_bert)
        cfg = TrainConfig(epochs=1, batch_size=16, noise_multiplier=0.5, seed=3, noise_seed=noise_seed)
        train(model, split, cfg, progress=False)
        return model.shared_state()

    a, b = trained(11), trained(11)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # by default the noise is unpredictable: the round's public seed must not let anyone subtract it
    c, d = trained(None), trained(None)
    assert not torch.equal(c["calibration.offset.weight"], d["calibration.offset.weight"])


def test_training_on_planted_structure_beats_most_pop(tmp_path, tiny_bert):
    path = make_synthetic_silo(tmp_path / "shop", SyntheticSpec(users=150, items=48, categories=4, seed=1))
    torch.manual_seed(0)
    model, split = setup(path, tiny_bert)
    baseline = most_pop(split)["test"]["ndcg@10"]
    untrained = evaluate(scorer(model), split.test)["ndcg@10"]
    train(model, split, TrainConfig(epochs=15, batch_size=32, lr=1e-2), progress=False)
    trained = evaluate(scorer(model), split.test)["ndcg@10"]
    assert trained > 1.5 * baseline, (trained, baseline, untrained)
    assert trained > untrained


def test_next_items_loss_averages_over_each_users_targets():
    from common.records import UserRecord

    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    batch = [UserRecord(0, np.array([3]), np.array([0, 2])), UserRecord(1, np.array([1]), np.array([2]))]
    masked = mask_history(logits, batch)
    assert masked[0, 3] == float("-inf") and masked[1, 1] == float("-inf")
    log_p0 = torch.log_softmax(torch.tensor([2.0, 0.0, 1.0]), 0)
    log_p1 = torch.log_softmax(torch.tensor([0.0, 0.0, 0.0]), 0)
    expected = -((log_p0[0] + log_p0[2]) / 2 + log_p1[2]) / 2
    assert next_items_loss(masked, batch).item() == pytest.approx(expected.item(), rel=1e-6)
