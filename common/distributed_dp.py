"""Distributed DP noise: each merchant adds a share of the Gaussian noise, on an integer lattice SecAgg+ sums exactly.

In `federation` mode one DP-SGD step (or one DP release of counts) is the sum
over merchants of each one's clipped per-user sum plus its share of the
noise, and the coordinator learns only that sum, through SecAgg+. SecAgg+
adds integers modulo 2³², so every share is an integer vector, made like this
(Kairouz, Liu and Steinke, "The Distributed Discrete Gaussian Mechanism",
ICML 2021):

1. clip the merchant's signal (a sum of per-user vectors each of L2 norm ≤ C)
   to ±`bound` per coordinate, a contraction that keeps the sensitivity C;
2. divide by the lattice step Δ and round stochastically to integers: for any
   fixed rounding draw, one user moves the rounded vector by at most
   C/Δ + √d in L2 (d coordinates, each rounding changes by < 1), so that is
   the sensitivity the noise is calibrated to;
3. add discrete Gaussian noise of variance σ²·(C/Δ + √d)²/m_min per
   coordinate (Canonne, Kamath, Steinke 2020's rejection sampler, with
   floating-point coins).

With at least m_min honest merchants in the sum, its noise has variance at
least σ²·(C/Δ + √d)²: the step is the central sampled Gaussian mechanism with
noise multiplier σ, accounted once. The sum of discrete Gaussians is within a
negligible distance of one (τ ≈ 10·m·exp(−2π²s²) for per-share std s, which is
above 10⁴ lattice units here), and a discrete Gaussian of that std has the
privacy loss of the continuous one it samples; the accountant treats it as
such, as TensorFlow Federated's `distributed_dp` does.

`plan` picks Δ so that a share stays inside SecAgg+'s range with
`TAIL` standard deviations of noise to spare (a share outside it has
probability below 10⁻⁵⁰ per coordinate) and the n shares' sum cannot wrap
modulo 2³². SecAgg+ is then told a clipping range equal to half its
quantization range, which makes its own quantisation the identity on these
integers: the coordinator recovers the exact integer sum, and the only
rounding is step 2's, at most n·Δ per coordinate, far below the noise.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

MODULUS = 2**32  # SecAgg+'s masks and sums are modulo this
MAX_RANGE = 2**30  # SecAgg+ casts quantised values to int32
TAIL = 16  # standard deviations of noise a share's range keeps spare: P(|Z| > 16 s) < 10⁻⁵⁰


class LatticeError(ValueError):
    """A lattice that cannot carry a share without its values being clipped or its sum wrapping."""


@dataclass(frozen=True)
class Lattice:
    """How one secure sum is encoded: step Δ, the signal's clip per coordinate, and SecAgg+'s integer range."""

    step: float  # Δ: float units per integer
    bound: float  # the signal is clipped to ±bound per coordinate before rounding
    range: int  # SecAgg+'s quantisation range T; a share lies in [−T/2, T/2]
    modulus: int = MODULUS

    @property
    def half(self) -> int:
        return self.range // 2

    def sensitivity(self, clip: float, dim: int) -> float:
        """One user's largest L2 effect on a rounded share, in lattice units: C/Δ + √d."""
        return clip / self.step + math.sqrt(dim)

    def share_std(self, noise_multiplier: float, clip: float, dim: int, min_replies: int) -> float:
        """The std of one merchant's noise share, in lattice units: σ·(C/Δ + √d)/√m_min."""
        return noise_multiplier * self.sensitivity(clip, dim) / math.sqrt(min_replies)

    def check(self, noise_multiplier: float, clip: float, dim: int, min_replies: int, merchants: int) -> None:
        """LatticeError unless a share fits the range (`check_share`) and `merchants` shares cannot wrap the sum."""
        self.check_share(noise_multiplier, clip, dim, min_replies)
        if merchants * self.range >= self.modulus:
            raise LatticeError(
                f"range {self.range} for {merchants} merchants does not fit SecAgg+ (modulus {self.modulus})"
            )

    def check_share(self, noise_multiplier: float, clip: float, dim: int, min_replies: int) -> None:
        """LatticeError unless one merchant's share fits the range with TAIL stds of its noise to spare."""
        if not (self.step > 0 and math.isfinite(self.step) and self.bound > 0 and math.isfinite(self.bound)):
            raise LatticeError(
                f"a lattice needs a finite step and bound > 0, not step {self.step!r}, bound {self.bound!r}"
            )
        if not (0 < self.range <= MAX_RANGE and self.range % 2 == 0 and self.range < self.modulus):
            raise LatticeError(f"range {self.range} does not fit SecAgg+ (modulus {self.modulus})")
        need = self.bound / self.step + 1 + TAIL * self.share_std(noise_multiplier, clip, dim, min_replies)
        if need > self.half:
            raise LatticeError(f"a share needs ±{need:.4g} lattice units, more than the range's ±{self.half}")

    def to_config(self) -> dict[str, float | int]:
        return asdict(self)

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> Lattice:
        return cls(
            step=float(config["step"]),
            bound=float(config["bound"]),
            range=int(config["range"]),
            modulus=int(config.get("modulus", MODULUS)),
        )


def plan(
    *,
    bound: float,
    noise_multiplier: float,
    clip: float,
    dim: int,
    min_replies: int,
    merchants: int,
    modulus: int = MODULUS,
) -> Lattice:
    """The finest lattice on which `merchants` shares of a `dim`-coordinate sum fit SecAgg+ (see the module doc)."""
    if merchants < 1 or min_replies < 1:
        raise LatticeError(f"a secure sum needs merchants ≥ 1 and m_min ≥ 1, not {merchants} and {min_replies}")
    top = min(MAX_RANGE, (modulus - 1) // merchants)
    span = 1 << (top.bit_length() - 1)  # a power of two: n·T < modulus
    half = span // 2
    scale = TAIL * noise_multiplier / math.sqrt(min_replies)
    room = half - 1 - scale * math.sqrt(dim)
    if room <= 0:
        raise LatticeError(f"{dim} coordinates of noise multiplier {noise_multiplier:g} do not fit a range of ±{half}")
    step = (bound + scale * clip) / room * (1 + 1e-9)  # a hair coarser, so rounding cannot tip `check` over
    lattice = Lattice(step=step, bound=float(bound), range=span, modulus=modulus)
    lattice.check(noise_multiplier, clip, dim, min_replies, merchants)
    return lattice


def encode(
    signal: Mapping[str, np.ndarray], lattice: Lattice, noise_std: float, *, rng: np.random.Generator | None = None
) -> dict[str, np.ndarray]:
    """One merchant's share: `signal` clipped, stochastically rounded to the lattice, plus discrete Gaussian noise.

    Integers carried as float64 (what SecAgg+'s quantiser takes), each in
    [−T/2, T/2]. `noise_std` is in lattice units (`Lattice.share_std`); the
    noise and the rounding come from OS entropy unless `rng` is given
    (experiments only: whoever knows the seed can subtract the noise).
    """
    rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    out = {}
    for name, values in signal.items():
        scaled = np.clip(np.asarray(values, np.float64), -lattice.bound, lattice.bound) / lattice.step
        rounded = np.floor(scaled + rng.random(scaled.shape))
        share = rounded + discrete_gaussian(noise_std, scaled.shape, rng) if noise_std > 0 else rounded
        # beyond TAIL stds (probability < 1e-50 a coordinate) SecAgg+ would clip it; clip it here, visibly the same
        out[name] = np.clip(share, -lattice.half, lattice.half)
    return out


def decode(mean: Mapping[str, np.ndarray], contributors: int, lattice: Lattice) -> dict[str, np.ndarray]:
    """The float sum of `contributors` shares from SecAgg+'s unmasked mean of them (exact integers, then × Δ)."""
    return {name: np.rint(np.asarray(v, np.float64) * contributors) * lattice.step for name, v in mean.items()}


def discrete_gaussian(std: float, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Samples of the discrete Gaussian N_Z(0, std²) (Canonne, Kamath, Steinke 2020, Algorithm 3), vectorised.

    Their algorithm is exact with exact coins; here the coins are float64
    uniforms, off by at most 2⁻⁵³ a draw.

    Draw Y from the discrete Laplace of scale t = ⌊std⌋ + 1 (a difference of
    two geometric variables) and keep it with probability
    exp(−(|Y| − std²/t)²/(2·std²)); redraw the rest.
    """
    size = int(np.prod(shape))
    out = np.empty(size, np.int64)
    todo = np.arange(size)
    t = math.floor(std) + 1
    p = -math.expm1(-1.0 / t)  # 1 − e^(−1/t), accurately for large t
    while len(todo):
        y = rng.geometric(p, len(todo)) - rng.geometric(p, len(todo))
        keep = rng.random(len(todo)) < np.exp(-np.square(np.abs(y) - std * std / t) / (2 * std * std))
        out[todo[keep]] = y[keep]
        todo = todo[~keep]
    return out.reshape(shape).astype(np.float64)
