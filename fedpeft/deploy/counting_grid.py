"""A ``Grid`` wrapper that polls for replies faster and counts the bytes each node sends and gets.

flwr 1.42's ``Grid.send_and_receive`` sleeps a fixed 3 s between pulls; every round (and each
of SecAgg+'s four stages) pays up to that much on top of the sites' own 3 s poll. This wrapper
pulls every ``poll_s`` instead, and records the payload bytes of every message per node, so
the SecAgg+ workflow (which calls ``send_and_receive`` itself) is measured too.

A round's waits share one deadline (:meth:`CountingGrid.round_deadline`): SecAgg+'s four
stages each ask for the full timeout, so without it a site that dies mid-round made the round
wait up to four timeouts. Within a round every wait ends at the deadline; a stage that starts
after it still gets ``stage_grace_s`` (SecAgg+ must unmask what the surviving sites sent).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from flwr.app import Message
from flwr.supercore.run import Run
from flwr.serverapp import Grid

from fedpeft.deploy.records import message_nbytes


class CountingGrid(Grid):
    """Delegates to ``inner``; faster ``send_and_receive``; per-node byte counters.

    Args:
        inner: The ServerApp's grid.
        poll_s: Seconds between pulls while waiting for replies.
        stage_grace_s: Within a round, the least a wait that starts at or after the round's
            deadline is given (SecAgg+'s last stages).
    """

    def __init__(self, inner: Grid, poll_s: float = 0.5, stage_grace_s: float = 10.0) -> None:
        self.inner = inner
        self.poll_s = poll_s
        self.stage_grace_s = stage_grace_s
        self.deadline: float | None = None  # time.monotonic() when the current round's waits end
        self.bytes_down: Counter[int] = Counter()  # node id -> bytes sent to it
        self.bytes_up: Counter[int] = Counter()  # node id -> bytes received from it

    def take_traffic(self) -> tuple[dict[int, int], dict[int, int]]:
        """Bytes down and up per node since the last call; resets the counters."""
        down, up = dict(self.bytes_down), dict(self.bytes_up)
        self.bytes_down.clear()
        self.bytes_up.clear()
        return down, up

    @contextmanager
    def round_deadline(self, timeout_s: float) -> Iterator[None]:
        """Every ``send_and_receive`` inside ends at most ``timeout_s`` from now (see module doc)."""
        self.deadline = time.monotonic() + timeout_s
        try:
            yield
        finally:
            self.deadline = None

    def set_run(self, run: Run) -> None:  # noqa: D102 - Grid interface
        self.inner.set_run(run)

    @property
    def run(self) -> Run:  # noqa: D102
        return self.inner.run

    def create_message(self, *args, **kwargs) -> Message:  # noqa: D102 - deprecated in flwr
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        messages = list(messages)
        for msg in messages:
            self.bytes_down[msg.metadata.dst_node_id] += message_nbytes(msg)
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        replies = list(self.inner.pull_messages(message_ids))
        for msg in replies:
            self.bytes_up[msg.metadata.src_node_id] += message_nbytes(msg)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``; pull replies every ``poll_s`` until all came or ``timeout`` passed.

        Inside :meth:`round_deadline`, the wait also ends at the round's deadline (but lasts at
        least ``stage_grace_s``, or ``timeout`` if shorter). ``timeout=None`` is refused: a node
        that died would make the server wait forever.
        """
        return list(self.send_and_stream(messages, timeout=timeout))

    def send_and_stream(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterator[Message]:
        """:meth:`send_and_receive`, yielding each reply as soon as it is pulled (streaming aggregation)."""
        if timeout is None:
            raise ValueError("send_and_receive needs a timeout (a dead node never replies)")
        pending = {mid for mid in self.push_messages(messages) if mid}
        now = time.monotonic()
        deadline = now + timeout
        if self.deadline is not None:
            deadline = min(deadline, max(self.deadline, now + self.stage_grace_s))
        while pending:
            got = list(self.pull_messages(pending))
            pending -= {m.metadata.reply_to_message_id for m in got}
            yield from got
            del got
            left = deadline - time.monotonic()
            if not pending or left <= 0:
                break
            time.sleep(min(self.poll_s, left))
