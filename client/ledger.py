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

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import accounting, atomic
from common.errors import SilorecError

LEDGER_FILE = "ledger.json"
KINDS = ("train", "popularity", "cooccurrence")


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
        """The ledger in `folder` (a new, empty one if there is none). δ is fixed for a silo's lifetime."""
        path = Path(folder) / LEDGER_FILE
        if not path.exists():
            return cls(path=path, budget=budget, delta=delta)
        try:
            data = json.loads(path.read_text())
            entries = [Entry(**e) for e in data["entries"]]
            saved_delta, saved_accountant = float(data["delta"]), data["accountant"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LedgerError(f"{path}: unreadable privacy ledger ({e}); restore it from backup — never delete it to reset ε") from None
        if entries and saved_delta != delta:
            raise LedgerError(f"{path}: this silo's ε was accounted at δ={saved_delta}; it cannot switch to δ={delta}")
        if saved_accountant not in accounting.ACCOUNTANTS:
            raise LedgerError(f"{path}: unknown accountant {saved_accountant!r}; restore the ledger from backup")
        # a silo keeps the accountant its ε was first computed with: its reported ε never jumps
        return cls(path=path, budget=budget, delta=delta, entries=entries, accountant=saved_accountant if entries else accounting.DEFAULT)

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
                f"noise multiplier {noise_multiplier:.3g} and sample rate {sample_rate:.3g} would take it to {total:.3f}"
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
        last = next((e.noise_multiplier for e in reversed(self.entries) if e.what == "train" and e.sample_rate == sample_rate), None)
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
