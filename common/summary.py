"""A silo's summary: what `check-data` prints and `silo.json` records."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from common.silo import ITEM_TEXT_FIELDS, Silo
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
    duplicates: int = 0  # interactions that repeat an earlier one exactly (user, item, time): kept, each counts
    before_1970: int = 0
    in_future: int = 0  # dated after the summary was made
    # item text that looks like personal data: item text feeds the shared model and the pooled keys
    personal_data: int = 0
    personal_examples: tuple[str, ...] = ()

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
            f"exact repeats    {self.duplicates:,} (same user, item and time; kept, each counts as an interaction)",
        ]

    def warnings(self) -> list[str]:
        """What check-data says is probably wrong, though the silo is valid."""
        out = []
        if self.before_1970:
            out.append(
                f"{self.before_1970:,} interaction(s) dated before 1970: milliseconds or a sign error read as seconds?"
            )
        if self.in_future:
            out.append(
                f"{self.in_future:,} interaction(s) dated in the future: milliseconds read as seconds, or a wrong "
                f"clock?"
            )
        if self.personal_data:
            out.append(
                f"{self.personal_data:,} item text value(s) look like personal data ("
                + "; ".join(self.personal_examples)
                + "): item text is read by the shared model and keys the pooled releases, so it must describe "
                "items, never people; remove it"
            )
        return out


EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# an international number, or digits right after a word that announces a phone (not ISBNs, years, model numbers)
PHONE = re.compile(r"\+\d[\d\s().-]{7,}\d|(?i:\b(?:tel|phone|call|mobile|fax)\b)\W{0,3}\d[\d\s().-]{6,}\d")


def personal_data(items: pd.DataFrame) -> tuple[int, tuple[str, ...]]:
    """How many item text values hold an e-mail address or a phone number, and up to three of them, located."""
    found, examples = 0, []
    for column in (c for c in ITEM_TEXT_FIELDS if c in items.columns):
        for item, text in zip(items["item_id"], items[column].fillna("").astype(str)):
            kind = "an e-mail address" if EMAIL.search(text) else "a phone number" if PHONE.search(text) else None
            if kind:
                found += 1
                if len(examples) < 3:
                    examples.append(f"field '{column}' of item {item!r} holds {kind}")
    return found, tuple(examples)


def summarize(silo: Silo) -> SiloSummary:
    """Counts and ranges of a validated silo."""
    per_user = silo.interactions.groupby("user_id", sort=False).size().to_numpy()
    ts = silo.interactions["timestamp"].to_numpy(dtype=np.int64)
    day = lambda ns: pd.Timestamp(int(ns), unit="ns", tz="UTC").strftime("%Y-%m-%d")  # noqa: E731
    now = pd.Timestamp.now(tz="UTC").value
    personal, examples = personal_data(silo.items)
    return SiloSummary(
        name=silo.name,
        users=len(per_user),
        items=silo.n_items,
        interactions=len(silo.interactions),
        evaluated_users=int((per_user >= MIN_EVAL_INTERACTIONS).sum()),
        median_history=float(np.median(per_user)),
        first=day(ts.min()),
        last=day(ts.max()),
        duplicates=int(silo.interactions.duplicated(["user_id", "item_id", "timestamp"]).sum()),
        before_1970=int((ts < 0).sum()),
        in_future=int((ts > now).sum()),
        personal_data=personal,
        personal_examples=examples,
    )
