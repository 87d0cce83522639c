"""Reject faulty client updates before they reach the aggregator (pool-agnostic, both runtimes).

:class:`fedpeft.fold.Fold` calls :func:`update_problem` on each update as it arrives.

A non-finite update (NaN, Inf), one whose keys or shapes differ from the global state, or one
whose delta norm exceeds ``federation.max_update_norm`` is dropped for the round like a failed
client, and named in ``metrics.jsonl`` with the reason. One site sending NaN would otherwise make
the whole global adapter NaN. Under secure aggregation only the mean is known, so a non-finite
mean stops the run (no single site can be named).
"""

from __future__ import annotations

import math

import torch

from fedpeft.errors import AggregationError
from fedpeft.state import ClientUpdate, State, state_mismatch



def update_problem(global_state: State, update: ClientUpdate, max_norm: float | None) -> str | None:
    """Why ``update`` cannot be aggregated into ``global_state``, or None if it can."""
    mismatch = state_mismatch(global_state, update.state)
    if mismatch is not None:
        return f"it does not fit the global adapter ({mismatch})"
    bad = [k for k, v in update.state.items() if not torch.isfinite(v).all()]
    if bad:
        return f"non-finite values (NaN or Inf) in {len(bad)} tensor(s), e.g. {bad[0]!r}"
    if update.num_examples < 0:
        return f"a negative num_examples ({update.num_examples})"
    norm = delta_norm(global_state, update.state)
    if not math.isfinite(norm):
        return "its update norm overflows (values too large)"
    if max_norm is not None and norm > max_norm:
        return f"update norm {norm:.4g} exceeds federation.max_update_norm={max_norm:g}"
    return None


def delta_norm(global_state: State, state: State) -> float:
    """L2 norm of ``state - global_state`` over every tensor (float64)."""
    total = sum(float(((state[k].double() - ref.double()) ** 2).sum()) for k, ref in global_state.items())
    return math.sqrt(total)


def check_secure_mean(mean: State | None, where: str) -> State | None:
    """``mean`` (a securely aggregated mean) once checked to be finite.

    Raises:
        AggregationError: if it has NaN or Inf (no single site can be named).
    """
    if mean is not None and not all(torch.isfinite(v).all() for v in mean.values()):
        raise AggregationError(f"{where}: the securely aggregated mean has non-finite values (NaN or Inf); "
                               "a site sent a faulty update, which secure aggregation cannot name")
    return mean


def check_global(state: State, rnd: int) -> None:
    """Stop before a non-finite global state is checkpointed.

    Raises:
        AggregationError: naming the round and the last good checkpoint.
    """
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise AggregationError(
            f"round {rnd}: the aggregated global adapter has non-finite values (NaN or Inf) in {len(bad)} "
            f"tensor(s), e.g. {bad[0]!r}. Nothing was saved for this round; the last good checkpoint is "
            f"round {rnd - 1}. Check the aggregator's hyperparameters (server_lr) or set "
            "federation.max_update_norm, then resume.")
