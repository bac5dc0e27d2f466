from __future__ import annotations

import json
import os

import numpy as np
import pytest
from opacus.accountants import create_accountant

from client.ledger import LedgerError, PrivacyBudgetExceeded, PrivacyLedger
from common import accounting


def test_planned_rounds_fit_the_budget_and_use_most_of_it(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, budget=8.0, delta=1e-3)
    rounds = 3
    for r in range(1, rounds + 1):
        sigma = ledger.plan(sample_rate=0.3, steps_per_round=6, rounds_left=rounds - r + 1)
        ledger.record(run="run", round=r, noise_multiplier=sigma, sample_rate=0.3, steps=6)
    assert 7.5 < ledger.spent() <= 8.0


def test_epsilon_accumulates_across_rounds_and_reopening(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, budget=100.0, delta=1e-3)
    e1 = ledger.record(run="a", round=1, noise_multiplier=1.0, sample_rate=0.2, steps=10)
    again = PrivacyLedger.open(tmp_path, budget=100.0, delta=1e-3)
    e2 = again.record(run="b", round=1, noise_multiplier=1.0, sample_rate=0.2, steps=10)
    assert e2 > e1
    assert e2 == pytest.approx(accounting.epsilon([(1.0, 0.2, 20)], 1e-3), rel=1e-6)  # never reset per round
    saved = json.loads((tmp_path / "ledger.json").read_text())
    assert [e["run"] for e in saved["entries"]] == ["a", "b"] and saved["epsilon"] == pytest.approx(e2)


def test_a_long_mixed_history_costs_what_opacus_says_of_it_whole(tmp_path):
    # The ledger compacts its history before the accountant sees it; the ε must stay Opacus's own
    # for releases (q = 1) and rounds at several noises and rates, entry by entry.
    history = [(2.0, 1.0, 1)] + [(1.1 + 0.1 * (r % 2), 0.25 + 0.25 * (r % 2), 3 + r % 4) for r in range(6)]
    ledger = PrivacyLedger.open(tmp_path, budget=1e6, delta=1e-4)
    for r, (sigma, q, steps) in enumerate(history):
        ledger.record(run="run", round=r, noise_multiplier=sigma, sample_rate=q, steps=steps)
    whole = create_accountant("prv")
    whole.history = list(history)
    with np.errstate(divide="ignore"):  # PRV's log(1 - q) at q = 1
        expected = whole.get_epsilon(delta=1e-4)
    assert ledger.spent() == pytest.approx(expected, rel=1e-3)
    assert PrivacyLedger.open(tmp_path, budget=1e6, delta=1e-4).spent() == pytest.approx(ledger.spent(), rel=1e-12)


def test_an_announced_step_is_admitted_only_within_the_budget(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, budget=2.0, delta=1e-4)
    total = ledger.admit(1.0, 0.1, 5)
    assert 0 < total <= 2.0 and ledger.entries == []  # admitting records nothing
    with pytest.raises(PrivacyBudgetExceeded, match="would take it to"):
        ledger.admit(0.5, 1.0, 50)
    for sigma, q, steps in ((0.0, 0.1, 1), (float("nan"), 0.1, 1), (1.0, 0.0, 1), (1.0, 1.5, 1), (1.0, 0.1, 0)):
        with pytest.raises(ValueError):
            ledger.admit(sigma, q, steps)


def test_an_older_ledger_keeps_the_accountant_it_was_written_with(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, budget=50, delta=1e-3)
    ledger.accountant = "rdp"
    ledger.record(run="a", round=1, noise_multiplier=1.0, sample_rate=0.1, steps=5)
    again = PrivacyLedger.open(tmp_path, budget=50, delta=1e-3)
    assert again.accountant == "rdp" and again.spent() == pytest.approx(
        accounting.epsilon([(1.0, 0.1, 5)], 1e-3, "rdp")
    )
    assert PrivacyLedger.open(tmp_path / "new", budget=50, delta=1e-3).accountant == accounting.DEFAULT


def test_a_silo_past_its_budget_refuses(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, budget=1.0, delta=1e-3)
    ledger.record(run="a", round=1, noise_multiplier=0.5, sample_rate=0.5, steps=50)
    assert ledger.spent() > 1.0
    with pytest.raises(PrivacyBudgetExceeded, match="budget 1"):
        ledger.plan(sample_rate=0.5, steps_per_round=5, rounds_left=1)


def test_delta_cannot_change_once_spent(tmp_path):
    PrivacyLedger.open(tmp_path, budget=8, delta=1e-3).record(
        run="a", round=1, noise_multiplier=1, sample_rate=0.1, steps=1
    )
    with pytest.raises(LedgerError, match="δ=0.001"):
        PrivacyLedger.open(tmp_path, budget=8, delta=1e-4)


def test_crash_during_write_leaves_previous_ledger_intact(tmp_path, monkeypatch):
    ledger = PrivacyLedger.open(tmp_path, budget=50, delta=1e-3)
    ledger.record(run="a", round=1, noise_multiplier=1.0, sample_rate=0.1, steps=5)
    before = (tmp_path / "ledger.json").read_bytes()

    def crash(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        ledger.record(run="a", round=2, noise_multiplier=1.0, sample_rate=0.1, steps=5)
    monkeypatch.undo()
    assert (tmp_path / "ledger.json").read_bytes() == before
    assert len(PrivacyLedger.open(tmp_path, budget=50, delta=1e-3).entries) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json", "ledger.seen"]  # no temporary file left behind


def test_damaged_ledger_is_an_error_not_a_reset(tmp_path):
    (tmp_path / "ledger.json").write_text("{ half")
    with pytest.raises(LedgerError, match="never delete or edit it"):
        PrivacyLedger.open(tmp_path, budget=8, delta=1e-3)


def _tampered(tmp_path, how):
    ledger = PrivacyLedger.open(tmp_path, budget=50, delta=1e-3)
    for r in range(3):
        ledger.record(run="a", round=r, noise_multiplier=1.0, sample_rate=0.2, steps=5)
    path = tmp_path / "ledger.json"
    data = json.loads(path.read_text())
    how(data, path)
    if path.exists():
        path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "how, match",
    [
        (lambda d, p: d["entries"].pop(), "no longer holds"),  # an entry dropped: a lower ε
        (lambda d, p: d["entries"][0].update(steps=0), "steps"),
        (lambda d, p: d["entries"][0].update(steps=-4), "steps"),
        (lambda d, p: d["entries"][1].update(noise_multiplier=50.0), "no longer holds"),  # a raised noise: a lower ε
        (lambda d, p: d["entries"][1].update(steps="five"), "whole numbers"),
        (lambda d, p: d["entries"][1].update(sample_rate=-0.2), "sample rate"),
        (lambda d, p: d["entries"][1].update(what="gift"), "kind"),
        (lambda d, p: p.unlink(), "is missing"),
    ],
)
def test_a_ledger_that_lost_or_changed_entries_is_refused_with_what_to_do(tmp_path, how, match):
    _tampered(tmp_path, how)
    with pytest.raises(LedgerError, match=match) as e:
        PrivacyLedger.open(tmp_path, budget=50, delta=1e-3)
    assert "backup" in str(e.value)


def test_an_older_backup_is_refused_and_an_edit_of_the_recorded_epsilon_too(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, budget=50, delta=1e-3)
    ledger.record(run="a", round=1, noise_multiplier=1.0, sample_rate=0.2, steps=5)
    backup = (tmp_path / "ledger.json").read_text()
    ledger.record(run="a", round=2, noise_multiplier=1.0, sample_rate=0.2, steps=5)
    (tmp_path / "ledger.json").write_text(backup)
    with pytest.raises(LedgerError, match="older backup"):
        PrivacyLedger.open(tmp_path, budget=50, delta=1e-3)
    fresh = tmp_path / "fresh"
    PrivacyLedger.open(fresh, budget=50, delta=1e-3).record(
        run="a", round=1, noise_multiplier=1.0, sample_rate=0.2, steps=5
    )
    (fresh / "ledger.seen").unlink()  # a hand-made ledger: its recorded ε must still be what its entries cost
    data = json.loads((fresh / "ledger.json").read_text())
    data["entries"][0]["noise_multiplier"] = 3.0
    (fresh / "ledger.json").write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="an entry was changed"):
        PrivacyLedger.open(fresh, budget=50, delta=1e-3)
