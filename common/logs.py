"""silorec's own log, apart from Flower's: what a run says of itself (rounds, merchants left out, releases).

A ServerApp or ClientApp process shows it on the console at INFO (Flower's
apps configure no logging of their own for it); a simulation instead turns
round records into one progress bar and keeps everything in the run's
`run.log` (`simulations.federated`).
"""

from __future__ import annotations

import logging
import sys

LOGGER = logging.getLogger("silorec")

if not LOGGER.handlers:  # once per process
    _console = logging.StreamHandler(sys.stderr)
    _console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    _console.setLevel(logging.INFO)
    LOGGER.addHandler(_console)
    LOGGER.setLevel(logging.DEBUG)
    LOGGER.propagate = False


def log(level: int, msg: str, *args: object, **extra: object) -> None:
    """Log `msg % args` at `level`; `extra` rides on the record (a round's number and figures, for a progress bar)."""
    LOGGER.log(level, msg, *args, extra={"silorec": extra} if extra else None)


def console_handler() -> logging.Handler:
    """The handler that prints silorec's log on the console (a simulation swaps it for a progress bar)."""
    return LOGGER.handlers[0]
