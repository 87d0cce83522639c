"""Streaming aggregation: each client update is screened and folded into running sums as it arrives.

The server of a round used to hold every update until it averaged them (~10 GB for 64 sites x
a 7B model's LoRA). A :class:`Fold` keeps instead, per tensor, the float64 sum of
``num_examples x state`` and drops each update once it is added, so the server holds O(1)
updates whatever the number of clients. Both runtimes feed it: the simulation's scheduler as
each client finishes, the Flower transport as each site's reply is pulled.

**Order.** Floating-point sums depend on their order, and the deployment must give the
simulation's adapter bit for bit, so updates are added in *sampled* order: one that arrives
before an earlier-sampled client's waits until that client has been added or dropped. In the
simulation (FIFO on each device) at most ``devices - 1`` wait; in a deployment, sites that answer
out of order wait (``Fold.peak_held`` counts them; each round logs it when above 1).
``ordered=False`` (``federation.fold_order: arrival``) adds in arrival order instead: strictly one
update held, at the price of last-bit differences between runs.

**Rules that need every update** (coordinate-wise median, trimmed mean, Ianvs plugins: any
aggregator with ``step_updates``) cannot stream: the fold then holds every accepted update, and
the round loop logs what that costs. A rule may also transform each update before it is added
(``prepare``: norm-bounded FedAvg clips the delta) and still stream.

Screening (:func:`fedpeft.update_checks.update_problem`: NaN/Inf, keys or shapes, norm above
``federation.max_update_norm``) happens in :meth:`Fold.add`, so a faulty update is refused before
it touches the sums, and named in ``metrics.jsonl``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from fedpeft.errors import AggregationError
from fedpeft.state import ClientUpdate, State
from fedpeft.update_checks import update_problem

log = logging.getLogger(__name__)

Prepare = Callable[[State, State], State]  # (global_state, client_state) -> state to add


class Fold:
    """One round's updates: screened, then added to float64 weighted sums (or held).

    Args:
        global_state: The state sent to the clients this round (screening reference).
        sampled: The round's clients in sampled order (the order of the sums).
        hold: Keep every accepted update (rules that need each one) instead of summing.
        max_norm: ``federation.max_update_norm`` (None: no bound).
        where: ``"[round r/R]"`` for log lines.
        prepare: Applied to each accepted update's state before it is added.
        ordered: Add in sampled order (bit-exact, see the module doc); False: arrival order.
    """

    def __init__(self, global_state: State, sampled: list[str], *, hold: bool = False,
                 max_norm: float | None = None, where: str = "", prepare: Prepare | None = None,
                 ordered: bool = True) -> None:
        self.global_state, self.sampled = global_state, list(sampled)
        self.hold, self.max_norm, self.where, self.prepare, self.ordered = hold, max_norm, where, prepare, ordered
        self.held: list[ClientUpdate] = []  # hold=True: every accepted update, in sampled order at the end
        self.dropped: list[dict[str, str]] = []
        self.accepted: list[str] = []
        self.peak_held = 0
        self._waiting: dict[str, ClientUpdate] = {}  # arrived before an earlier-sampled client
        self._done: set[str] = set()  # added or dropped
        self._next = 0  # index into sampled of the next client to add
        self._sums: State = {}
        self._weight = 0
        self._lock = threading.Lock()

    def restart(self) -> None:
        """Forget everything added or dropped: a pool retries the round from scratch."""
        with self._lock:
            self.held, self.dropped, self.accepted, self._waiting, self._done = [], [], [], {}, set()
            self._next, self._sums, self._weight = 0, {}, 0

    def add(self, update: ClientUpdate) -> str | None:
        """Screen ``update`` and add it (thread-safe); the reason it was refused, or None.

        A refused update is named in :attr:`dropped` like a client that failed.
        """
        problem = update_problem(self.global_state, update, self.max_norm)
        with self._lock:
            if problem is not None:
                log.warning("%s: client %s dropped: %s", self.where, update.client_id, problem)
                self._gone(update.client_id, f"rejected update: {problem}")
                return problem
            if self.prepare is not None:
                update = ClientUpdate(update.client_id, self.prepare(self.global_state, update.state),
                                      update.num_examples, update.metrics)
            self.accepted.append(update.client_id)
            if self.hold:
                self.held.append(update)
                self.peak_held = len(self.held)
            elif self.ordered and update.client_id in self.sampled:
                self._waiting[update.client_id] = update
                self.peak_held = max(self.peak_held, len(self._waiting))
                self._advance()
            else:
                self.peak_held = max(self.peak_held, 1)
                self._sum(update)
        return None

    def drop(self, client_id: str, reason: str) -> None:
        """Record that ``client_id`` will send nothing this round (failed, timed out, refused)."""
        with self._lock:
            self._gone(client_id, reason)

    def _gone(self, client_id: str, reason: str) -> None:
        self.dropped.append({"client": client_id, "reason": reason})
        self._done.add(client_id)
        self._advance()

    def _advance(self) -> None:
        """Add the waiting updates whose every earlier-sampled client is done."""
        while self._next < len(self.sampled):
            cid = self.sampled[self._next]
            if cid in self._waiting:
                self._sum(self._waiting.pop(cid))
                self._done.add(cid)
            elif cid not in self._done:
                return
            self._next += 1

    def _sum(self, update: ClientUpdate) -> None:
        n = update.num_examples
        for key, value in update.state.items():
            term = value.detach().to("cpu", torch.float64) * n
            if key in self._sums:
                self._sums[key] += term
            else:
                self._sums[key] = term
        self._weight += n

    def result(self) -> tuple[list[ClientUpdate] | None, State | None]:
        """``(updates, None)`` when holding (in sampled order), else ``(None, weighted mean)``.

        Raises:
            AggregationError: if no update was accepted, or they weigh nothing.
        """
        with self._lock:
            for cid in [c for c in self.sampled if c in self._waiting]:  # predecessors never reported
                self._sum(self._waiting.pop(cid))
            for update in list(self._waiting.values()):  # not sampled (a pool's own ids): arrival order
                self._sum(update)
            self._waiting.clear()
            if not self.accepted:
                raise AggregationError("no client updates to aggregate: at least one client must succeed")
            if self.hold:
                order = {c: i for i, c in enumerate(self.sampled)}
                return sorted(self.held, key=lambda u: order.get(u.client_id, len(order))), None
            if self._weight == 0:
                raise AggregationError(
                    f"total num_examples of the updates is 0 (clients {self.accepted}): nothing to weight the "
                    "mean by; give each client at least one training example")
            return None, {k: (v / self._weight).to(torch.float32) for k, v in self._sums.items()}
