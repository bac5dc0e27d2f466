"""Shared by tests that are not fixtures."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def distinctive_user_ids(data: Path) -> Path:
    """Give a synthetic silo's users ids long enough that one found in random bytes is no accident."""
    for name in ("interactions.csv", "users.csv"):
        frame = pd.read_csv(data / name, dtype=str)
        frame["user_id"] = "customer-" + frame["user_id"].str.removeprefix("u").str.zfill(6) + "-x7"
        frame.to_csv(data / name, index=False)
    return data
