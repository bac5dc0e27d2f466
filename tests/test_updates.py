from __future__ import annotations

import numpy as np
import pytest

from server.updates import UpdateRejected, aggregate, screen, spec_of

SPEC = spec_of({"a.lora_A": np.zeros((2, 3), np.float32), "a.lora_B": np.zeros((3, 2), np.float32)})


def good(scale=0.1):
    return {"a.lora_A": np.full((2, 3), scale, np.float32), "a.lora_B": np.full((3, 2), -scale, np.float32)}


def test_a_good_update_passes_and_reports_its_norm():
    assert screen(good(), SPEC, max_norm=10) == pytest.approx(np.sqrt(12 * 0.01), rel=1e-6)


@pytest.mark.parametrize(
    "change,reason",
    [
        (lambda u: u.pop("a.lora_B"), "missing tensor a.lora_B"),
        (lambda u: u.update({"b.lora_A": np.zeros(1, np.float32)}), "unexpected tensor b.lora_A"),
        (lambda u: u.update({"a.lora_A": np.zeros((3, 2), np.float32)}), "shape (3, 2), expected (2, 3)"),
        (lambda u: u.update({"a.lora_A": np.zeros((2, 3), np.float64)}), "dtype float64, expected float32"),
        (lambda u: u["a.lora_B"].__setitem__((0, 0), np.nan), "non-finite"),
        (lambda u: u["a.lora_B"].__setitem__((0, 0), np.inf), "non-finite"),
        (lambda u: u["a.lora_A"].__setitem__((0, 0), 100.0), "exceeds the bound"),
    ],
)
def test_bad_updates_are_rejected_with_their_reason(change, reason):
    u = good()
    change(u)
    with pytest.raises(UpdateRejected, match=reason.replace("(", r"\(").replace(")", r"\)")):
        screen(u, SPEC, max_norm=10)


def test_fedavg_is_users_weighted():
    out = aggregate([good(1.0), good(4.0)], [3, 1])
    assert np.allclose(out["a.lora_A"], 1.75) and out["a.lora_A"].dtype == np.float32


def test_median_and_trimmed_mean_resist_one_outlier():
    updates = [good(1.0), good(1.1), good(0.9), good(1.0), good(1000.0)]
    assert np.allclose(aggregate(updates, [1] * 5, "median")["a.lora_A"], 1.0)
    assert np.allclose(
        aggregate(updates, [1] * 5, "trimmed-mean", trim=0.2)["a.lora_A"], 1.0 + 0.1 / 3 - 0.1 / 3, atol=0.04
    )
    assert aggregate(updates, [1] * 5, "fedavg")["a.lora_A"].mean() > 100
