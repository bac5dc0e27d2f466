"""A silo's summary: what `check-data` prints and `silo.json` records."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from common.silo import Silo
from common.split import MIN_EVAL_INTERACTIONS


@dataclass(frozen=True)
class SiloSummary:
    name: str
    users: int
    items: int
    interactions: int
    evaluated_users: int
    median_history: float
    first: str
    last: str

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        return [
            f"silo             {self.name}",
            f"users            {self.users:,}",
            f"items            {self.items:,}",
            f"interactions     {self.interactions:,}",
            f"evaluated users  {self.evaluated_users:,} (≥{MIN_EVAL_INTERACTIONS} interactions)",
            f"median history   {self.median_history:g} interactions per user",
            f"date range       {self.first} .. {self.last}",
        ]


def summarize(silo: Silo) -> SiloSummary:
    """Counts and ranges of a validated silo."""
    per_user = silo.interactions.groupby("user_id", sort=False).size().to_numpy()
    ts = silo.interactions["timestamp"].to_numpy(dtype=np.int64)
    day = lambda ns: pd.Timestamp(int(ns), unit="ns", tz="UTC").strftime("%Y-%m-%d")  # noqa: E731
    return SiloSummary(
        name=silo.name,
        users=len(per_user),
        items=silo.n_items,
        interactions=len(silo.interactions),
        evaluated_users=int((per_user >= MIN_EVAL_INTERACTIONS).sum()),
        median_history=float(np.median(per_user)),
        first=day(ts.min()),
        last=day(ts.max()),
    )
