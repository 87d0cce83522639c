"""Shared pieces of every aggregator: the registry, the interface, :func:`aggregate`, tensor helpers.

Aggregators compose these functions rather than inherit from a base class. An aggregator is a
server optimizer: ``step(global_state, mean_state)``. Most depend on the client updates only
through their sample-weighted mean, which is exactly what secure aggregation reveals and what
the server can sum as updates arrive (:class:`fedpeft.fold.Fold`); :func:`aggregate` is the one
place that calls ``step`` on it. Robust rules (median, trimmed mean) read each update instead
(``step_updates``).
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch

from fedpeft.errors import AggregationError, ConfigError
from fedpeft.registry import Registry
from fedpeft.state import ClientUpdate, State, state_mismatch

def _adapt(obj: object, name: str) -> type:
    from fedpeft.aggregators.ianvs_plugin import ianvs_aggregator

    return ianvs_aggregator(obj, name)


AGGREGATORS: Registry[type] = Registry("aggregators", adapt=_adapt)
"""Aggregator classes by name (``fedavg``, ``fedavgm``, ...); see :mod:`fedpeft.registry`. A plugin
written for Ianvs/sedna (``aggregate(clients)``) is adapted (:mod:`fedpeft.aggregators.ianvs_plugin`)."""


@runtime_checkable
class Aggregator(Protocol):
    """What the round loop and the Flower server need from a server aggregation rule.

    Optional methods change how the round gathers updates (:class:`fedpeft.fold.Fold`):
    ``step_updates(global_state, updates) -> State`` replaces ``step`` for a rule that reads
    each update (the server then holds them all; refused with secure aggregation), and
    ``prepare(global_state, client_state) -> State`` transforms each update before it is summed.
    """

    def step(self, global_state: State, mean_state: State) -> State:
        """New global state from the sent state and the clients' sample-weighted mean."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Server optimizer state (momentum, moments, step count) for checkpoints."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...


def aggregate(aggregator: Aggregator, global_state: State, updates: list[ClientUpdate] | None = None,
              *, mean: State | None = None) -> State:
    """The new global state: ``aggregator.step`` on the clients' sample-weighted mean.

    Args:
        aggregator: The server rule.
        global_state: The state that was sent to the clients this round.
        updates: The clients' updates (plain aggregation); checked against ``global_state``.
        mean: Their weighted mean instead, when only the mean is known (secure aggregation).

    Raises:
        AggregationError: if the updates are empty, weigh nothing, or mismatch the global state.
    """
    if mean is None and needs_every_update(aggregator):  # median, trimmed mean, an Ianvs plugin
        _check_weights(updates or [], need_weight=False)
        for update in updates or []:
            check_state(global_state, update.state, f"client {update.client_id!r}")
        return aggregator.step_updates(global_state, updates or [])
    if mean is None:
        check_updates(global_state, updates or [])
        prepare = getattr(aggregator, "prepare", None)  # as the Fold does to each update
        if prepare is not None:
            updates = [ClientUpdate(u.client_id, prepare(global_state, u.state), u.num_examples, u.metrics)
                       for u in updates or []]
        mean = weighted_mean(updates or [])
    else:
        check_state(global_state, mean, "the securely aggregated mean of the client updates")
    return aggregator.step(global_state, mean)


def needs_every_update(aggregator: object) -> bool:
    """Whether ``aggregator`` reads each update (``step_updates``), so the server must hold them all."""
    return callable(getattr(aggregator, "step_updates", None))


def check_state(reference: State, state: State, who: str) -> None:
    """Check that ``state`` has exactly ``reference``'s keys and shapes.

    Args:
        reference: The state to compare against (usually the global state that was sent).
        state: The state to check.
        who: What ``state`` is, for the message (``"client 'client-3'"``).

    Raises:
        AggregationError: naming the missing or extra keys, or the key whose shape differs.
    """
    problem = state_mismatch(reference, state)
    if problem is None:
        return
    raise AggregationError(f"{who} does not match the global state: {problem}. All clients must train the same adapter (same PEFT method, "
                           "target modules and hyperparameters such as the LoRA rank).")


def check_updates(global_state: State, updates: list[ClientUpdate]) -> None:
    """Check that ``updates`` can be averaged into ``global_state``.

    Raises:
        AggregationError: if there are no updates, a negative or all-zero ``num_examples``,
            or a client whose keys or shapes differ from ``global_state``.
    """
    _check_weights(updates)
    for update in updates:
        check_state(global_state, update.state, f"client {update.client_id!r}")


def _check_weights(updates: list[ClientUpdate], need_weight: bool = True) -> None:
    if not updates:
        raise AggregationError("no client updates to aggregate: at least one client must succeed")
    negative = [u.client_id for u in updates if u.num_examples < 0]
    if negative:
        raise AggregationError(f"num_examples must be >= 0, got a negative count from {negative}")
    if need_weight and sum(u.num_examples for u in updates) == 0:
        ids = [u.client_id for u in updates]
        raise AggregationError(
            f"total num_examples of the updates is 0 (clients {ids}): nothing to weight the "
            "mean by; give each client at least one training example"
        )


def weighted_mean(updates: list[ClientUpdate]) -> State:
    """Mean of the clients' states weighted by ``num_examples`` (FedAvg's average).

    Sums are taken in float64 so many clients or large weights lose no precision; the
    result is cast back to float32.

    Args:
        updates: Client updates with matching keys and shapes.

    Returns:
        A new float32 state; the updates are not modified.

    Raises:
        AggregationError: if the updates are empty, weigh nothing, or disagree on keys/shapes.
    """
    _check_weights(updates)
    reference = updates[0].state
    for update in updates[1:]:
        check_state(reference, update.state, f"client {update.client_id!r}")
    total = float(sum(u.num_examples for u in updates))
    mean: State = {}
    for key in reference:
        acc = torch.zeros(reference[key].shape, dtype=torch.float64)
        for update in updates:
            acc += update.state[key].detach().to("cpu", torch.float64) * update.num_examples
        mean[key] = (acc / total).to(torch.float32)
    return mean


def clone_state(state: State) -> State:
    """A float32 CPU copy of ``state``, so callers cannot alias the tensors kept or returned."""
    return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in state.items()}


def zeros_like_state(state: State) -> State:
    """A float32 state of zeros with ``state``'s keys and shapes."""
    return {k: torch.zeros_like(v, dtype=torch.float32) for k, v in state.items()}


def as_float32(state: State) -> State:
    """``state`` as float32 CPU tensors (no copy when already so; never modified in place)."""
    return {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}


def require_in_range(name: str, value: float, low: float, high: float | None = None) -> None:
    """Check ``low <= value < high`` (or ``value > low`` when ``high`` is None).

    Raises:
        ConfigError: e.g. "`beta` must be in [0, 1), got -1".
    """
    ok = math.isfinite(value) and (low <= value < high if high is not None else value > low)
    if not ok:
        allowed = f"in [{low:g}, {high:g})" if high is not None else f"> {low:g}"
        raise ConfigError(f"`{name}` must be {allowed}, got {value:g}")


def require_state_keys(state: dict[str, Any], keys: list[str], owner: str) -> None:
    """Check that a server optimizer ``state`` (from a checkpoint) has ``keys``.

    Raises:
        AggregationError: naming the missing keys, e.g. when resuming with another aggregator.
    """
    missing = [k for k in keys if k not in state]
    if missing:
        raise AggregationError(
            f"{owner} optimizer state is missing {missing} (found {sorted(state)}); was the "
            "checkpoint written by a different aggregator?"
        )


def stacked(updates: list[ClientUpdate], key: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Tensor ``key`` of every update, stacked: ``(clients, *shape)`` (float32 sorts exactly in half the memory)."""
    return torch.stack([u.state[key].detach().to("cpu", dtype) for u in updates])


def refuse_mean(rule: str) -> AggregationError:
    """The error of a rule that reads each update when only their mean is known (secure aggregation)."""
    return AggregationError(f"`{rule}` reads every client's update, but secure aggregation reveals only their mean; "
                            "use it without secure aggregation, or choose fedavg, fedavgm, norm_bounded, ...")
