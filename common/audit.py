"""The arithmetic of a one-run privacy audit (Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training
Run", 2023): how many correct guesses about secretly included canaries an (ε, δ)-DP training could allow.

m canaries are each included with probability ½ by a coin only the auditor
knows; after training, the auditor guesses "in" or "out" for r of them and is
right v times. Under (ε, δ)-DP, v is at most as large as the number of heads
in r coins of bias e^ε/(1 + e^ε), up to a δ term (their Theorem 3). So a v
that such coins would reach with probability below `level` shows the training
is not (ε, δ)-DP: the largest such ε is an empirical lower bound on its ε.
"""

from __future__ import annotations

import math

LEVEL = 0.05  # the p-value below which an ε is rejected: a 95% confident lower bound


def _pmf(k: int, r: int, q: float) -> float:
    """P[Binomial(r, q) = k]."""
    if q <= 0.0 or q >= 1.0:
        return float(k == (r if q >= 1.0 else 0))
    log = math.lgamma(r + 1) - math.lgamma(k + 1) - math.lgamma(r - k + 1) + k * math.log(q) + (r - k) * math.log1p(-q)
    return math.exp(log)


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The probability, under (ε, δ)-DP, of at least v correct guesses out of r about m canaries.

    P[Binomial(r, q) ≥ v] + 2·m·δ·max over i = 1…v of P[v > Binomial(r, q) ≥ v − i] / i,
    with q = e^ε / (1 + e^ε); at most 1.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 ≤ correct ({v}) ≤ guesses ({r}) ≤ canaries ({m})")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need ε ≥ 0 and δ in [0, 1], not ε={epsilon}, δ={delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    pmf = [_pmf(k, r, q) for k in range(r + 1)]
    beta = sum(pmf[v:])
    alpha, below = 0.0, 0.0  # below: P[v > Binomial(r, q) ≥ v − i]
    for i in range(1, v + 1):
        below += pmf[v - i]
        alpha = max(alpha, below / i)
    return min(1.0, beta + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, *, level: float = LEVEL) -> float:
    """The largest ε whose p-value for v correct guesses of r stays below `level` (0 if even ε = 0's does not).

    The p-value grows with ε, so the bound is found by bisection, to 1e-6.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), not {level}")
    if p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < level:
        low, high = high, 2 * high
        if high > 1e3:  # every guess right out of very many: no finite ε allows it at this level
            return math.inf
    while high - low > 1e-6:
        middle = (low + high) / 2
        low, high = (middle, high) if p_value(m, r, v, middle, delta) < level else (low, middle)
    return low
