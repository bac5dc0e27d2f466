"""What a simulation prints: one progress bar over the rounds, and the merchants left out; the full log in run.log.

Flower logs each SecAgg+ stage and each sampling at INFO, twice (its console
handler, and again through the root logger), and every Ray actor echoes its
own output: model-loading bars, library deprecation warnings, SecAgg+ DEBUG
lines. Without `verbose` the console keeps only Flower's and Ray's warnings,
silorec's warnings (a merchant refused, dropped or rejected, a round
abandoned) and a bar with each round's latest validation figure and ε;
`run.log` in the run folder keeps the driver's whole log either way, and the
actors' output stays in Ray's own session logs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

from common.logs import LOGGER, console_handler

RUN_LOG = "run.log"


class RoundProgress(logging.Handler):
    """silorec's log as a progress bar over rounds (ETA, latest validation NDCG@10, ε) and its warnings above it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.bar: tqdm | None = None
        self.valid: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        info = getattr(record, "silorec", None) or {}
        if "round" not in info:
            if record.levelno >= logging.WARNING:
                tqdm.write(f"warning: {record.getMessage()}")
            return
        if self.bar is None:
            self.bar = tqdm(total=info["rounds"], desc="rounds", unit="round", dynamic_ncols=True)
        self.valid = info.get("valid") if info.get("valid") is not None else self.valid
        figures = [
            f"valid NDCG@10 {self.valid:.4f}" if self.valid is not None else "",
            f"ε {info['epsilon']:.2f}" if info.get("epsilon") is not None else "",
        ]
        self.bar.set_postfix_str(", ".join(f for f in figures if f))
        self.bar.update(info["round"] - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        super().close()


class _Deprecations(logging.Filter):
    """Flower's notice that `run_simulation` is deprecated: silorec knows, and says nothing to its user about it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage()


@contextmanager
def simulation_console(out: Path, *, verbose: bool) -> Iterator[None]:
    """Quiet Flower and Ray on the console (unless `verbose`) and keep the driver's whole log in OUT/run.log."""
    from flwr.common.logger import console_handler as flwr_console

    flwr, ray = logging.getLogger("flwr"), logging.getLogger("ray")
    out.mkdir(parents=True, exist_ok=True)
    file = logging.FileHandler(out / RUN_LOG, encoding="utf-8")
    file.setLevel(logging.DEBUG)
    file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    saved = (flwr.propagate, flwr_console.level, ray.level, os.environ.get("FLWR_LOG_LEVEL"))
    ours, progress, deprecations = console_handler(), RoundProgress(), _Deprecations()
    for logger in (flwr, LOGGER):
        logger.addHandler(file)
    if not verbose:
        flwr.propagate = False  # its own handler prints it once
        flwr_console.setLevel(logging.WARNING)
        flwr_console.addFilter(deprecations)
        ray.setLevel(logging.WARNING)
        os.environ["FLWR_LOG_LEVEL"] = "WARNING"  # the actors' Flower, when they start
        LOGGER.removeHandler(ours)
        LOGGER.addHandler(progress)
    try:
        yield
    finally:
        for logger in (flwr, LOGGER):
            logger.removeHandler(file)
        file.close()
        if not verbose:
            LOGGER.removeHandler(progress)
            progress.close()
            LOGGER.addHandler(ours)
            flwr_console.removeFilter(deprecations)
            flwr.propagate, _, _, level = saved
            flwr_console.setLevel(saved[1])
            ray.setLevel(saved[2])
            if level is None:
                os.environ.pop("FLWR_LOG_LEVEL", None)
            else:
                os.environ["FLWR_LOG_LEVEL"] = level
