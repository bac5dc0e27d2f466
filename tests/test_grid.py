"""PromptGrid: the coordinator's send_and_receive collects every reply, stops at its timeout, and delegates the rest."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from server import grid as prompt


class FakeGrid:
    """Replies to message i turn up at the (i+1)-th pull after its push; message "lost" never gets one."""

    def __init__(self) -> None:
        self.pulls = 0
        self.pending: dict[str, int] = {}
        self.run_id = 7

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            self.pending[m] = self.pulls + i + 1
            ids.append(m)
        return ids

    def pull_messages(self, ids):
        self.pulls += 1
        ready = [i for i in ids if i != "lost" and self.pending[i] <= self.pulls]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ready]


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch):
    monkeypatch.setattr(prompt.time, "sleep", lambda seconds: None)


def test_every_reply_is_collected_once_and_the_rest_is_the_wrapped_grids():
    fake = FakeGrid()
    grid = prompt.PromptGrid(fake)
    replies = grid.send_and_receive(["a", "b", "c"])
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b", "c"]
    assert fake.pulls == 3  # one reply a pull: no pull after the last one
    assert grid.run_id == 7


def test_a_reply_that_never_comes_ends_at_the_timeout_with_the_others(monkeypatch):
    clock = iter(range(10_000))
    monkeypatch.setattr(prompt.time, "monotonic", lambda: next(clock) * 0.5)  # half a second a call
    grid = prompt.PromptGrid(FakeGrid())
    replies = grid.send_and_receive(["a", "lost", "b"], timeout=20)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]


def test_the_pause_between_empty_pulls_backs_off_to_its_ceiling(monkeypatch):
    pauses = []
    monkeypatch.setattr(prompt.time, "sleep", pauses.append)
    fake = FakeGrid()
    push = fake.push_messages

    def late(messages):  # the one reply turns up at the 12th pull
        ids = push(messages)
        fake.pending = dict.fromkeys(ids, 12)
        return ids

    fake.push_messages = late
    prompt.PromptGrid(fake).send_and_receive(["a"])
    assert pauses[0] == prompt.FIRST and len(pauses) == 12
    assert all(b >= a for a, b in zip(pauses, pauses[1:])) and max(pauses) == prompt.MOST
