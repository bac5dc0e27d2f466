"""Noise shares on SecAgg+'s lattice: exact sums, the central noise from the shares, and the ranges that hold them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.common.secure_aggregation.quantization import quantize

from common.distributed_dp import TAIL, Lattice, LatticeError, decode, discrete_gaussian, encode, plan


def test_the_discrete_gaussian_has_the_law_it_names():
    rng = np.random.default_rng(0)
    for std in (0.8, 3.0, 250.0):
        x = discrete_gaussian(std, (200_000,), rng)
        assert np.all(x == np.round(x)) and abs(x.mean()) < 4 * std / math.sqrt(len(x))
        assert x.std() == pytest.approx(std, rel=0.01 if std > 1 else 0.03)
    # P(0) / P(1) = exp(1 / (2 std²)) exactly for N_Z(0, std²)
    x = discrete_gaussian(1.0, (400_000,), rng)
    assert (x == 0).sum() / (x == 1).sum() == pytest.approx(math.exp(0.5), rel=0.02)


def test_secaggs_quantiser_is_the_identity_on_a_share():
    lattice = plan(bound=50.0, noise_multiplier=1.5, clip=1.0, dim=1000, min_replies=3, merchants=3)
    share = encode({"w": np.random.default_rng(1).normal(0, 5, 1000)}, lattice, lattice.share_std(1.5, 1.0, 1000, 3))
    (quantised,) = quantize([share["w"]], lattice.half, lattice.range)  # what Flower's secaggplus_mod does with it
    assert np.array_equal(quantised.astype(np.int64), share["w"].astype(np.int64) + lattice.half)


def test_shares_sum_to_the_signal_plus_the_central_noise():
    # 8 merchants, each with its own signal; m_min = 8, so their noise adds up to σ·C at the sum
    n, dim, sigma, clip = 8, 20_000, 1.3, 1.0
    rng = np.random.default_rng(2)
    signals = [{"a": rng.normal(0, 2, dim // 2), "b": rng.normal(0, 2, dim // 2)} for _ in range(n)]
    lattice = plan(bound=40.0, noise_multiplier=sigma, clip=clip, dim=dim, min_replies=n, merchants=n)
    std = lattice.share_std(sigma, clip, dim, n)
    shares = [encode(s, lattice, std, rng=rng) for s in signals]
    mean = {k: sum(s[k] for s in shares) / n for k in ("a", "b")}  # what SecAgg+ hands back: the mean of the shares
    total = decode(mean, n, lattice)
    noise = np.concatenate([total[k] - sum(s[k] for s in signals) for k in ("a", "b")])
    central = sigma * clip * (1 + math.sqrt(dim) * lattice.step / clip)  # σ·C, widened by the rounding's share
    assert abs(noise.mean()) < 4 * central / math.sqrt(dim)
    assert noise.std() == pytest.approx(central, rel=0.03)
    assert central < 1.001 * sigma * clip  # the rounding costs under 0.1% more noise here


def test_without_noise_the_sum_is_exact_to_the_rounding():
    n, dim = 11, 5000
    rng = np.random.default_rng(3)
    signals = [{"g": rng.normal(0, 3, dim)} for _ in range(n)]
    lattice = plan(bound=30.0, noise_multiplier=0.0, clip=1.0, dim=dim, min_replies=n, merchants=n)
    shares = [encode(s, lattice, 0.0, rng=rng) for s in signals]
    total = decode({"g": sum(s["g"] for s in shares) / n}, n, lattice)["g"]
    assert np.abs(total - sum(s["g"] for s in signals)).max() <= n * lattice.step
    assert lattice.step < 1e-6


def test_a_lattice_leaves_tail_room_and_cannot_wrap():
    for merchants in (2, 11, 100):
        lattice = plan(
            bound=170.0, noise_multiplier=1.5, clip=1.0, dim=74_115, min_replies=merchants, merchants=merchants
        )
        assert merchants * lattice.range < lattice.modulus and lattice.range & (lattice.range - 1) == 0
        need = lattice.bound / lattice.step + 1 + TAIL * lattice.share_std(1.5, 1.0, 74_115, merchants)
        assert need <= lattice.half < 1.001 * need
        with pytest.raises(LatticeError, match="more than the range"):  # a finer step would not fit
            Lattice(lattice.step / 1.01, lattice.bound, lattice.range).check(1.5, 1.0, 74_115, merchants, merchants)
        with pytest.raises(LatticeError, match="does not fit SecAgg"):  # one merchant more could wrap the sum
            lattice.check(1.5, 1.0, 74_115, merchants, 2 * merchants + 1)
