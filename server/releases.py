"""Federation mode's start: who takes part, then the statistics released once for every merchant's users together.

1. Census: each merchant sends, sealed to the run, how many of its users can
   train and the keys of its item texts (`common.popularity.text_keys`). The
   coordinator learns the catalogs as hashes of their texts (catalog text is
   not private) and the federation's user count, which sets the sample rate.
2. Popularity: one secure sum over the union of those keys, of each merchant's
   per-user counts (L2 norm 1 a user) plus its share of the noise
   (`common.distributed_dp`): one Gaussian release over all users at noise
   multiplier `prior-noise`, in every merchant's ledger. Each merchant is
   handed the pooled counts of its own keys.
3. Co-occurrence: the `common.cooccurrence.SIZE` keys most popular by that
   release (post-processing of it), one secure sum of their pair counts, and
   the matrix projected to rank `RANK` (post-processing again); each merchant
   is handed the rows and columns of its own items.

Where the silo mode releases once per merchant, this releases once for all:
the noise of one release instead of one per merchant, over every user. A run
without DP releases the same sums with no noise: the non-private federation
is the same computation at σ = 0, pooled statistics included.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from common import distributed_dp
from common.accounting import Entry
from common.cooccurrence import RANK, SIZE, project, symmetric
from common.logs import log
from common.messages import ASK_CENSUS, CENSUS_KIND, USE_NEIGHBOURS, USE_POOLED, SumSpec
from common.popularity import look_up
from common.round import RoundConfig
from server import queries
from server.sealing import Envelope
from server.secagg import SecureSum


@dataclass
class Census:
    """The merchants of a federation-mode run: each one's silo, trainable users and item-text keys."""

    silos: dict[int, str]
    users: dict[int, int]
    keys: dict[int, np.ndarray]

    @property
    def nodes(self) -> set[int]:
        return set(self.silos)

    @property
    def total_users(self) -> int:
        return sum(self.users.values())

    @property
    def max_users(self) -> int:
        return max(self.users.values(), default=0)

    def union(self) -> np.ndarray:
        """Every item-text key of every merchant, sorted, once."""
        return np.unique(np.concatenate([k for k in self.keys.values()] or [np.zeros(0, np.uint64)]))

    def to_json(self) -> dict[str, Any]:
        return {"merchants": {str(n): {"silo": self.silos[n], "users": self.users[n]} for n in sorted(self.silos)}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Census:
        merchants = {int(n): m for n, m in data["merchants"].items()}
        return cls({n: m["silo"] for n, m in merchants.items()}, {n: int(m["users"]) for n, m in merchants.items()}, {})


def take_census(
    grid: Grid, envelope: Envelope, cfg: RoundConfig, *, min_nodes: int, timeout: float | None = None
) -> tuple[Census, dict]:
    """Ask every connected merchant for its trainable users and item keys; merchants that give none are left out."""
    _, nodes = sample_nodes(grid, min_nodes, 0)
    answers = queries.ask(grid, envelope, cfg, ASK_CENSUS, nodes, kind=CENSUS_KIND, timeout=timeout)
    census = Census({}, {}, {})
    for a in answers:
        try:
            users = int(np.asarray(a.arrays["users"]).ravel()[0]) if a.arrays is not None else 0
            keys = np.asarray(a.arrays["keys"]) if a.arrays is not None else None
        except (KeyError, IndexError, ValueError) as e:
            a.arrays, a.reason, a.rejected = None, f"not a census: {e}", True
            continue
        if keys is None or keys.dtype != np.uint64 or keys.ndim != 1 or users <= 0:
            a.reason = a.reason or "no user can train"
            a.arrays = None
            continue
        census.silos[a.node], census.users[a.node], census.keys[a.node] = a.silo, users, keys
    summary = queries.summary_of(answers) | {"merchants": len(census.silos), "users": census.total_users}
    for a in answers:
        if a.arrays is None:
            log(WARNING, "census: %s takes no part: %s", a.silo, a.reason or "no reason given")
    return census, summary


def release_statistics(
    secure: SecureSum,
    grid: Grid,
    envelope: Envelope,
    cfg: RoundConfig,
    census: Census,
    *,
    min_replies: int,
    timeout: float | None = None,
) -> tuple[list[Entry], dict[str, bool], dict[str, Any]]:
    """The federation's popularity (and co-occurrence) releases: their accountant entries, what every merchant
    now holds ({"prior", "neighbours"}), and what metrics.jsonl records of them."""
    entries: list[Entry] = []
    held = {"prior": False, "neighbours": False}
    summary: dict[str, Any] = {}
    if cfg.prior_noise <= 0:
        return entries, held, summary
    union = census.union()
    noise = _noise(cfg, cfg.prior_noise)
    counts, report = _secure_release(secure, cfg, census, "popularity", noise, union, len(union), min_replies)
    if cfg.private:  # every merchant that sent its share recorded it, unmasked or not
        entries.append((noise, 1.0, 1))
    summary["popularity"] = report | {"item_texts": len(union)}
    if counts is None:
        return entries, held, summary
    pooled = (union, counts)
    failed = queries.hand_out(
        grid,
        envelope,
        cfg,
        USE_POOLED,
        {
            node: {"keys": keys, "counts": look_up(pooled, keys).astype(np.float32)}
            for node, keys in census.keys.items()
        },
        timeout=timeout,
    )
    held["prior"] = not failed
    summary["popularity"]["not_taken"] = [census.silos[n] for n in failed]
    log(
        INFO,
        "popularity: released once over %d merchants' %d users, %d item texts (noise multiplier %g)",
        len(census.silos),
        census.total_users,
        len(union),
        noise,
    )
    if cfg.cooccurrence_noise <= 0:
        return entries, held, summary
    top = np.sort(union[np.argsort(-counts, kind="stable")[:SIZE]])
    size = len(top)
    noise = _noise(cfg, cfg.cooccurrence_noise)
    pairs, report = _secure_release(
        secure, cfg, census, "cooccurrence", noise, top, size * (size - 1) // 2, min_replies
    )
    if cfg.private:
        entries.append((noise, 1.0, 1))
    summary["cooccurrence"] = report | {"items": size}
    if pairs is None:
        return entries, held, summary
    matrix = project(symmetric(pairs, size), RANK)
    rows = {node: np.flatnonzero(np.isin(top, keys)) for node, keys in census.keys.items()}
    failed = queries.hand_out(
        grid,
        envelope,
        cfg,
        USE_NEIGHBOURS,
        {
            node: {"keys": top[mine], "matrix": np.ascontiguousarray(matrix[np.ix_(mine, mine)])}
            for node, mine in rows.items()
        },
        timeout=timeout,
    )
    held["neighbours"] = not failed
    summary["cooccurrence"]["not_taken"] = [census.silos[n] for n in failed]
    log(
        INFO,
        "co-occurrence: released once over the %d most popular item texts (noise multiplier %g)",
        size,
        noise,
    )
    return entries, held, summary


def _noise(cfg: RoundConfig, noise_multiplier: float) -> float:
    """A release's noise multiplier: the configured one under DP; without DP (`no-dp`) the sums are exact."""
    return float(noise_multiplier) if cfg.private else 0.0


def _secure_release(
    secure: SecureSum,
    cfg: RoundConfig,
    census: Census,
    task: str,
    noise: float,
    keys: np.ndarray,
    dim: int,
    min_replies: int,
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """One release as a secure sum over `keys` (sealed to each merchant): its noisy total (None if abandoned) and
    what to record of it."""
    name = "counts" if task == "popularity" else "pairs"
    # one user adds at most 1 to any count, so a merchant's counts are within ±its users: never clipped
    lattice = distributed_dp.plan(
        bound=float(census.max_users),
        noise_multiplier=noise,
        clip=1.0,
        dim=dim,
        min_replies=min_replies,
        merchants=len(census.silos),
    )
    spec = SumSpec(task, (name,), noise, 1.0, min_replies, 1.0, lattice)
    result = secure(
        0,
        cfg.to_record(),
        spec,
        sealed={"keys": np.asarray(keys, np.uint64)},
        nodes=census.nodes,
        shapes={name: (dim,)},
    )
    report = {
        "merchants": result.contributors,
        "took_part": sorted(m.silo for m in result.accepted),
        "noise_multiplier": noise,
        "lattice": lattice.to_config(),
    }
    if result.total is None:
        log(WARNING, "%s release abandoned: %s; merchants score without it", task, result.reason)
        return None, report | {"abandoned": result.reason}
    return np.asarray(result.total[name], np.float64), report
