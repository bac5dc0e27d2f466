"""The one accountant: Opacus's own ε for a compacted history, and the least noise that fits a budget."""

from __future__ import annotations

import numpy as np
import pytest
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from common import accounting


@pytest.mark.parametrize("name", accounting.ACCOUNTANTS)
def test_a_compacted_history_costs_what_opacus_says_of_the_history_as_it_was(name):
    history = [(2.0, 1.0, 1), (1.2, 0.3, 3), (1.0, 1.0, 1), (1.2, 0.3, 2), (1.5, 0.5, 4), (1.2, 0.3, 1)]
    assert accounting.compact(history) == ((1.0, 1.0, 1), (1.2, 0.3, 6), (1.5, 0.5, 4), (2.0, 1.0, 1))
    whole = create_accountant(name)
    whole.history = list(history)
    with np.errstate(divide="ignore"):
        expected = whole.get_epsilon(delta=1e-4)
    assert accounting.epsilon(history, 1e-4, name) == pytest.approx(expected, rel=1e-3)
    assert accounting.epsilon([], 1e-4, name) == 0.0


def test_entries_that_no_accountant_can_mean_are_refused():
    for entry in (
        (0.0, 0.1, 1),
        (-1.0, 0.1, 1),
        (float("inf"), 0.1, 1),
        (1.0, 0.0, 1),
        (1.0, 1.01, 1),
        (1.0, float("nan"), 1),
        (1.0, 0.1, 0),
        (1.0, 0.1, -3),
        (1.0, 0.1, 1.5),
    ):
        with pytest.raises(ValueError):
            accounting.epsilon([entry], 1e-4)
    with pytest.raises(ValueError, match="δ"):
        accounting.epsilon([(1.0, 0.1, 1)], 0.0)
    with pytest.raises(ValueError, match="unknown accountant"):
        accounting.epsilon([(1.0, 0.1, 1)], 1e-4, "moments")


def test_noise_after_an_earlier_release_fits_what_is_left_of_the_budget():
    release = [(2.0, 1.0, 1)]  # the popularity prior's one Gaussian release
    sigma = accounting.noise_for(8.0, 1e-4, sample_rate=0.25, steps=40, history=release)
    assert accounting.epsilon([*release, (sigma, 0.25, 40)], 1e-4) <= 8.0
    assert accounting.epsilon([*release, (sigma / 1.05, 0.25, 40)], 1e-4) > 8.0  # and no noisier than it must be
    alone = get_noise_multiplier(target_epsilon=8.0, target_delta=1e-4, sample_rate=0.25, steps=40, accountant="prv")
    assert alone < sigma < 1.2 * alone
    with pytest.raises(ValueError, match="is spent before them"):
        accounting.noise_for(8.0, 1e-4, sample_rate=0.25, steps=40, history=[(0.3, 1.0, 1)])
