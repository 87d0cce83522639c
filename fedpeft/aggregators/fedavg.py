"""FedAvg: the new global state is the clients' sample-weighted mean.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017. https://arxiv.org/abs/1602.05629
"""

from __future__ import annotations

from typing import Any

from fedpeft.aggregators.base import (
    AGGREGATORS,
    check_state,
    check_updates,
    clone_state,
    weighted_mean,
)
from fedpeft.state import ClientUpdate, State


@AGGREGATORS.register("fedavg")
class FedAvg:
    """Federated averaging; has no hyperparameters and no server optimizer state."""

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        """Weighted mean of ``updates``, checked against ``global_state``.

        Raises:
            AggregationError: if the updates are empty, weigh nothing, or mismatch the global state.
        """
        check_updates(global_state, updates)
        return self.step(global_state, weighted_mean(updates))

    def step(self, global_state: State, mean_state: State) -> State:
        """Return a copy of ``mean_state`` (the weighted mean is the new global state)."""
        check_state(global_state, mean_state, "the mean of the client updates")
        return clone_state(mean_state)

    def state_dict(self) -> dict[str, Any]:
        """FedAvg keeps no server state: ``{}``."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""
