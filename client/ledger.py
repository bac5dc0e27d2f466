"""A silo's privacy ledger: every round and release its users took part in, and the ε they cost together.

The ledger answers one question: "may I train this round, and with how much
noise?" In `silo` mode it plans the noise so that the rounds still to come fit
the budget; in `federation` mode the coordinator announces the noise and the
sample rate of each step and the ledger checks them against the budget
(`admit`) rather than trusting the coordinator's arithmetic. It records what
was actually spent and is rewritten atomically, so a crash mid-write leaves
the previous ledger intact. ε is computed by `common.accounting` (Opacus's
accountant) over the whole history, across every round and every run that used
this silo's state folder; it is never reset.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import accounting, atomic
from common.errors import SilorecError

LEDGER_FILE = "ledger.json"
SEEN_FILE = (
    "ledger.seen"  # the most entries this state folder's ledger ever held, and their hash: a ledger must keep them
)
KINDS = ("train", "popularity", "cooccurrence")
RESTORE = "restore ledger.json from your newest backup — never delete or edit it to reset ε"


class PrivacyBudgetExceeded(SilorecError):
    """Training the requested round would take the silo past its ε budget."""


class LedgerError(SilorecError):
    """The ledger file is unreadable or disagrees with the requested setting."""


@dataclass(frozen=True)
class Entry:
    """One round trained: what the accountant needs, and what it said afterwards."""

    run: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float
    time: float
    # "train": DP-SGD steps; "popularity" / "cooccurrence": the one release of the item counts / of
    # the item pair counts (each sample rate 1, 1 step)
    what: str = "train"


@dataclass
class PrivacyLedger:
    path: Path
    budget: float
    delta: float
    entries: list[Entry] = field(default_factory=list)
    accountant: str = accounting.DEFAULT

    @classmethod
    def open(cls, folder: Path, *, budget: float, delta: float) -> PrivacyLedger:
        """The ledger in `folder` (a new, empty one if there is none), checked whole. δ is fixed for a silo's lifetime.

        LedgerError if it is unreadable, holds an entry no accountant can
        mean, disagrees with the ε it recorded, or holds fewer or other
        entries than this state folder's ledger once held (SEEN_FILE).
        """
        path = Path(folder) / LEDGER_FILE
        seen = _read_seen(Path(folder) / SEEN_FILE)
        if not path.exists():
            if seen["entries"]:
                raise LedgerError(
                    f"{path} is missing, but this state folder's ledger held {seen['entries']} entries: {RESTORE}"
                )
            return cls(path=path, budget=budget, delta=delta)
        try:
            data = json.loads(path.read_text())
            entries = [_entry(e) for e in data["entries"]]
            saved_delta, saved_accountant = float(data["delta"]), data["accountant"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise LedgerError(f"{path}: unreadable privacy ledger ({e}); {RESTORE}") from None
        if saved_accountant not in accounting.ACCOUNTANTS:
            raise LedgerError(f"{path}: unknown accountant {saved_accountant!r}; {RESTORE}")
        if entries and saved_delta != delta:
            raise LedgerError(f"{path}: this silo's ε was accounted at δ={saved_delta}; it cannot switch to δ={delta}")
        if len(entries) < seen["entries"] or _digest(entries[: seen["entries"]]) != seen["sha256"]:
            raise LedgerError(
                f"{path}: it no longer holds the {seen['entries']} entries this state folder's ledger held "
                f"(entries dropped, changed or an older backup restored); {RESTORE}"
            )
        # a silo keeps the accountant its ε was first computed with: its reported ε never jumps
        ledger = cls(
            path=path,
            budget=budget,
            delta=delta,
            entries=entries,
            accountant=saved_accountant if entries else accounting.DEFAULT,
        )
        ledger._check_recorded()
        return ledger

    def _check_recorded(self) -> None:
        """LedgerError unless the recorded ε never decreases and the last one is what the history costs now."""
        recorded = [e.epsilon_after for e in self.entries]
        if any(b < a - 1e-9 for a, b in zip(recorded, recorded[1:])):
            raise LedgerError(f"{self.path}: the ε it recorded decreases along its entries; {RESTORE}")
        if recorded and not math.isclose(self.spent(), recorded[-1], rel_tol=1e-6, abs_tol=1e-9):
            raise LedgerError(
                f"{self.path}: its entries cost ε {self.spent():.6g} at δ={self.delta:g}, but it recorded "
                f"{recorded[-1]:.6g} (an entry was changed); {RESTORE}"
            )

    @property
    def history(self) -> list[accounting.Entry]:
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    def spent(self) -> float:
        """ε spent over every round and release recorded."""
        return accounting.epsilon(self.history, self.delta, self.accountant)

    def cost(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """ε after adding `steps` steps at this noise and sample rate."""
        return accounting.epsilon([*self.history, (noise_multiplier, sample_rate, steps)], self.delta, self.accountant)

    def admit(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> float:
        """The ε total after these steps, if they fit the budget; PrivacyBudgetExceeded (or ValueError for nonsense) if not."""
        total = self.cost(*accounting.check_entry(noise_multiplier, sample_rate, steps))
        if total > self.budget:
            raise PrivacyBudgetExceeded(
                f"ε spent {self.spent():.3f} of budget {self.budget:g} (δ={self.delta:g}): {steps} more step(s) at "
                f"noise multiplier {noise_multiplier:.3g} and sample rate {sample_rate:.3g} would take it to "
                f"{total:.3f}"
            )
        return total

    def plan(self, *, sample_rate: float, steps_per_round: int, rounds_left: int) -> float:
        """The smallest noise multiplier (to 1%) for which `rounds_left` such rounds stay within the budget.

        Raises PrivacyBudgetExceeded when not even MAX_NOISE would fit.
        """
        steps = steps_per_round * max(1, rounds_left)

        def fits(sigma: float) -> bool:
            return self.cost(sigma, sample_rate, steps) <= self.budget

        spent = self.spent()
        if spent >= self.budget or not fits(accounting.MAX_NOISE):
            raise PrivacyBudgetExceeded(
                f"ε spent {spent:.3f} of budget {self.budget:g} (δ={self.delta:g}): "
                f"{rounds_left} more round(s) of {steps_per_round} steps would exceed it"
            )
        # The last round's plan usually still holds (what it spent is what it planned): two
        # accountant calls to confirm it instead of a dozen to find it again.
        last = next(
            (e.noise_multiplier for e in reversed(self.entries) if e.what == "train" and e.sample_rate == sample_rate),
            None,
        )
        if last is not None and fits(last) and not fits(last / 1.01):
            return last
        return accounting.smallest_noise(fits)

    def record(
        self, *, run: str, round: int, noise_multiplier: float, sample_rate: float, steps: int, what: str = "train"
    ) -> float:
        """Append a trained round (or another release), save atomically, and return ε spent in total."""
        if what not in KINDS:
            raise ValueError(f"unknown ledger entry kind {what!r}; one of {', '.join(KINDS)}")
        epsilon = self.cost(*accounting.check_entry(noise_multiplier, sample_rate, steps))
        self.entries.append(Entry(run, round, noise_multiplier, sample_rate, steps, epsilon, time.time(), what))
        self.save()
        return epsilon

    def save(self) -> None:
        """Write the ledger, then what it now holds (SEEN_FILE); a crash between leaves the ledger ahead, which opens."""
        atomic.write_json(
            self.path,
            {
                "budget": self.budget,
                "delta": self.delta,
                "accountant": self.accountant,
                "epsilon": self.spent(),
                "entries": [asdict(e) for e in self.entries],
            },
        )
        atomic.write_json(
            self.path.with_name(SEEN_FILE), {"entries": len(self.entries), "sha256": _digest(self.entries)}
        )


def _entry(data: dict) -> Entry:
    """An entry read back, its types and values checked (ValueError, TypeError otherwise)."""
    if not isinstance(data, dict):
        raise TypeError(f"an entry is a mapping, not {type(data).__name__}")
    entry = Entry(**data)
    for name in ("noise_multiplier", "sample_rate", "epsilon_after", "time"):
        if isinstance(getattr(entry, name), bool) or not isinstance(getattr(entry, name), (int, float)):
            raise TypeError(f"entry field {name} must be a number, not {getattr(entry, name)!r}")
    if isinstance(entry.steps, bool) or not isinstance(entry.steps, int) or not isinstance(entry.round, int):
        raise TypeError(f"entry steps and round must be whole numbers, not {entry.steps!r} and {entry.round!r}")
    if entry.what not in KINDS:
        raise ValueError(f"unknown entry kind {entry.what!r}")
    if not (math.isfinite(entry.epsilon_after) and entry.epsilon_after >= 0):
        raise ValueError(f"entry epsilon_after must be finite and ≥ 0, not {entry.epsilon_after!r}")
    accounting.check_entry(entry.noise_multiplier, entry.sample_rate, entry.steps)
    return entry


def _digest(entries: list[Entry]) -> str:
    return hashlib.sha256(json.dumps([asdict(e) for e in entries], sort_keys=True).encode()).hexdigest()


def _read_seen(path: Path) -> dict:
    if not path.is_file():
        return {"entries": 0, "sha256": _digest([])}
    try:
        seen = json.loads(path.read_text())
        return {"entries": int(seen["entries"]), "sha256": str(seen["sha256"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LedgerError(f"{path}: unreadable ({e}); restore it with ledger.json from your newest backup") from None
