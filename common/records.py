"""User records for training: one record per user, so that a DP sample is a user.

A record is a prefix of the user's training history and the items that came
next (the first `next_items` of them: several targets per user give the
model more to learn from per step at no extra forward pass). Every epoch draws a fresh cut point per user from a generator seeded by
(seed, epoch, user), so the records are reproducible and each user still
contributes exactly one record to each pass, which is what user-level DP-SGD
with Poisson sampling over users assumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from common.split import Split

Cut = Literal["random", "recent", "last"]
CUTS: tuple[str, ...] = ("random", "recent", "last")
RECENT = 10  # cut="recent": the prefix ends within the last this many training items


@dataclass(frozen=True)
class UserRecord:
    """`history` (catalog indices, oldest first) → `targets` (what came next, in order), for user `user`."""

    user: int
    history: np.ndarray
    targets: np.ndarray

    @property
    def target(self) -> int:
        """The item that came immediately after the history."""
        return int(self.targets[0])


class UserRecords:
    """A map-style data set (usable by torch's DataLoader) over the users who can train.

    A user can train when their training history has at least two items.
    `cut="random"` draws the prefix length uniformly per epoch; `cut="recent"`
    draws it among the last RECENT positions, where a user is evaluated
    (what comes after the whole history); `cut="last"` always predicts the
    last training item from everything before it.
    """

    def __init__(self, split: Split, *, seed: int = 0, cut: Cut = "random", next_items: int = 1) -> None:
        if next_items < 1:
            raise ValueError(f"next_items must be at least 1, not {next_items}")
        if cut not in CUTS:
            raise ValueError(f"cut must be one of {', '.join(CUTS)}, not {cut!r}")
        self.histories = split.train
        self.next_items = next_items
        self.users = np.array([u for u, h in enumerate(split.train) if len(h) >= 2], dtype=np.int64)
        self.seed = seed
        self.cut = cut
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw new cut points: each epoch gives every user a fresh record."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, i: int) -> UserRecord:
        user = int(self.users[i])
        seq = self.histories[user]
        if self.cut == "last":
            t = len(seq) - 1
        else:
            low = max(1, len(seq) - RECENT) if self.cut == "recent" else 1
            t = int(np.random.default_rng((self.seed, self.epoch, user)).integers(low, len(seq)))
        return UserRecord(user=user, history=seq[:t], targets=seq[t : t + self.next_items])

    def records(self) -> list[UserRecord]:
        """This epoch's records, one per trainable user."""
        return [self[i] for i in range(len(self))]
