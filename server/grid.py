"""The coordinator's grid, which takes the merchants' replies as soon as they are in.

Flower's deployment grid (`HttpGrid.send_and_receive`, Flower 1.42) looks
for replies every 3 s, so every exchange of a round (the census, each
SecAgg+ stage, each hand-out) took at least one such wait whatever the
merchants' compute: on 127.0.0.1, 6.2 s a SecAgg+ stage and 31 s a round
for 0.3-0.6 s of the slowest merchant's own work (docs/results.md).
`PromptGrid` pushes the same way and pulls after `FIRST` seconds, then
backs off by `BACKOFF` up to `MOST` between pulls: a reply is taken within
about a tenth of a second while a round is quick, and a long round costs a
pull a second. The SuperNode's own wait between pulls (3 s when it finds
nothing) is Flower's and stays.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

FIRST = 0.05  # seconds before the first pull
BACKOFF = 1.5
MOST = 1.0  # seconds between pulls at the most


class PromptGrid:
    """`grid` with a `send_and_receive` that polls for the replies promptly; everything else is `grid`'s."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push `messages`, then pull until every one has its reply or `timeout` seconds have passed."""
        waiting = set(self._grid.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        pause = FIRST
        while waiting:
            time.sleep(pause if end is None else max(0.0, min(pause, end - time.monotonic())))
            got = list(self._grid.pull_messages(waiting))
            replies.extend(got)
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if end is not None and time.monotonic() >= end:
                break
            pause = FIRST if got else min(MOST, pause * BACKOFF)
        return replies
