"""Split one data set into merchant silos, the way a federation of shops might hold it.

- `region`: users grouped by the first character of their ZIP code (one group
  per leading digit, merged into N merchants; non-digit codes form one extra
  silo).
- `dirichlet`: users assigned to merchants by a seeded Dirichlet draw over
  their dominant category (smaller `alpha` = more skewed merchants).
- `catalog`: each merchant sells a disjoint set of categories and keeps only
  the interactions on its own items (users may then shop at several).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from common import atomic
from common.errors import PartitionError
from common.silo import CATEGORY_SEPARATOR, Silo, load_silo, write_silo
from common.summary import SiloSummary, summarize

Scheme = Literal["region", "dirichlet", "catalog"]
SCHEMES: tuple[str, ...] = ("region", "dirichlet", "catalog")
MIN_USERS_PER_MERCHANT = 2


@dataclass(frozen=True)
class Share:
    """One merchant's part: its users (or, for `catalog`, its items) and a note on how it was chosen."""

    name: str
    users: frozenset[str] | None = None
    items: frozenset[str] | None = None
    note: str = ""


def plan(silo: Silo, merchants: int, scheme: Scheme, *, seed: int = 0, alpha: float = 0.5) -> list[Share]:
    """Decide which users (or items) each merchant gets."""
    if merchants < 1:
        raise PartitionError(f"--merchants must be at least 1, not {merchants}")
    if scheme == "region":
        return _by_region(silo, merchants)
    if scheme == "dirichlet":
        return _by_dirichlet(silo, merchants, seed=seed, alpha=alpha)
    if scheme == "catalog":
        return _by_catalog(silo, merchants)
    raise PartitionError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


def write_partition(
    silo: Silo, shares: list[Share], out: Path, *, scheme: str, seed: int, force: bool = False
) -> list[SiloSummary]:
    """Write one silo folder per share under `out` (all or nothing) and return their summaries."""
    summaries = []
    inter = silo.interactions
    with atomic.directory(out, replace=force, made_by="silorec-sim partition") as scratch:
        for share in shares:
            if share.users is not None:
                rows = inter[inter["user_id"].isin(share.users)]
                items = silo.items
            else:
                rows = inter[inter["item_id"].isin(share.items)]
                items = silo.items[silo.items["item_id"].isin(share.items)]
            users = None
            if silo.users is not None:
                users = silo.users[silo.users["user_id"].isin(set(rows["user_id"]))]
            folder = scratch / share.name
            write_silo(folder, items, rows, users)
            summary = summarize(load_silo(folder))  # re-read: what we wrote must validate
            summaries.append(summary)
            atomic.write_json(
                folder / "silo.json",
                {
                    "name": share.name,
                    "users": summary.users,
                    "items": summary.items,
                    "interactions": summary.interactions,
                    "scheme": scheme,
                    "seed": seed,
                    "note": share.note,
                },
            )
        atomic.write_json(
            scratch / "partition.json",
            {"source": str(silo.root), "scheme": scheme, "seed": seed, "silos": [s.name for s in shares]},
        )
    return summaries


def _by_region(silo: Silo, merchants: int) -> list[Share]:
    if merchants > 10:
        raise PartitionError(f"the region scheme has 10 digit regions; --merchants must be at most 10, not {merchants}")
    if silo.users is None or "zip_code" not in silo.users.columns:
        raise PartitionError(f"{silo.root}: the region scheme needs a users file with a zip_code column")
    zips = dict(zip(silo.users["user_id"], silo.users["zip_code"]))
    groups: dict[str, set[str]] = {}
    for user in pd.unique(silo.interactions["user_id"]):
        first = zips.get(user, "")[:1]
        if first.isdigit():
            lo = int(first) * merchants // 10  # digits 0-9 in contiguous runs
            digits = "".join(str(d) for d in range(10) if d * merchants // 10 == lo)
            key = f"region-{digits}"
        else:
            key = "region-other"
        groups.setdefault(key, set()).add(user)
    names = sorted(k for k in groups if k != "region-other") + (["region-other"] if "region-other" in groups else [])
    return [Share(n, users=frozenset(groups[n]), note=_region_note(n)) for n in names]


def _region_note(name: str) -> str:
    if name == "region-other":
        return "users whose ZIP code does not start with a digit"
    return "users whose ZIP code starts with " + " or ".join(name.removeprefix("region-"))


def _categories(silo: Silo) -> list[list[str]]:
    cats = [[c for c in s.split(CATEGORY_SEPARATOR) if c] for s in silo.items["category"]]
    if not any(cats):
        raise PartitionError(
            f"{silo.root}: this scheme needs item categories, and the items file has none in field 'category'"
        )
    return cats


def _by_dirichlet(silo: Silo, merchants: int, *, seed: int, alpha: float) -> list[Share]:
    if alpha <= 0:
        raise PartitionError(f"--alpha must be positive, not {alpha}")
    cats = _categories(silo)
    users, dominant = _dominant_categories(silo, cats)
    if len(users) < merchants * MIN_USERS_PER_MERCHANT:
        raise PartitionError(f"{len(users)} users cannot fill {merchants} merchants with {MIN_USERS_PER_MERCHANT} each")
    rng = np.random.default_rng(seed)
    for _attempt in range(100):  # redraw until every merchant has a few users, as is usual for this scheme
        owner = np.empty(len(users), dtype=np.int64)
        for cat in sorted(set(dominant)):
            idx = np.flatnonzero(np.asarray(dominant) == cat)
            p = rng.dirichlet(np.full(merchants, alpha))
            owner[idx] = rng.choice(merchants, size=len(idx), p=p)
        if np.bincount(owner, minlength=merchants).min() >= MIN_USERS_PER_MERCHANT:
            break
    else:
        raise PartitionError(
            f"alpha={alpha} leaves some of {merchants} merchants nearly empty in 100 draws; raise --alpha"
        )
    width = len(str(merchants - 1))
    return [
        Share(
            f"dirichlet-{m:0{width}d}",
            users=frozenset(users[owner == m]),
            note=f"Dirichlet(alpha={alpha}) over dominant category",
        )
        for m in range(merchants)
    ]


def _dominant_categories(silo: Silo, cats: list[list[str]]) -> tuple[np.ndarray, list[str]]:
    """Each user's most frequent item category (ties to the alphabetically first)."""
    counts: dict[str, Counter] = {}
    for user, item in zip(silo.interactions["user_id"], silo.interactions["item"]):
        counts.setdefault(user, Counter()).update(cats[item] or ["(none)"])
    users = np.array(list(counts), dtype=object)
    dominant = [min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for c in counts.values()]
    return users, dominant


def _by_catalog(silo: Silo, merchants: int) -> list[Share]:
    cats = _categories(silo)
    primary = [c[0] if c else "(none)" for c in cats]
    load = Counter(primary[i] for i in silo.interactions["item"])
    if merchants > len(load):
        raise PartitionError(
            f"the catalog scheme needs at least as many categories with interactions ({len(load)}) as merchants "
            f"({merchants})"
        )
    for p in set(primary):
        load.setdefault(p, 0)  # unsold categories still go to someone's catalog
    # Longest-processing-time first: biggest category to the least-loaded merchant.
    owned: list[list[str]] = [[] for _ in range(merchants)]
    totals = [0] * merchants
    for cat, n in sorted(load.items(), key=lambda kv: (-kv[1], kv[0])):
        m = min(range(merchants), key=lambda j: (totals[j], j))
        owned[m].append(cat)
        totals[m] += n
    width = len(str(merchants - 1))
    shares = []
    for m, mine in enumerate(owned):
        items = frozenset(silo.items["item_id"][[p in mine for p in primary]])
        shares.append(Share(f"catalog-{m:0{width}d}", items=items, note="categories: " + ", ".join(sorted(mine))))
    return shares
