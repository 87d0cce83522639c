"""FedAvg: the new global state is the clients' sample-weighted mean.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017. https://arxiv.org/abs/1602.05629
"""

from __future__ import annotations

from typing import Any

from fedpeft.aggregators.base import (
    AGGREGATORS,
    check_state,
    clone_state,
)
from fedpeft.state import State


@AGGREGATORS.register("fedavg")
class FedAvg:
    """Federated averaging; has no hyperparameters and no server optimizer state."""

    def step(self, global_state: State, mean_state: State) -> State:
        """Return a copy of ``mean_state`` (the weighted mean is the new global state)."""
        check_state(global_state, mean_state, "the mean of the client updates")
        return clone_state(mean_state)

    def state_dict(self) -> dict[str, Any]:
        """FedAvg keeps no server state: ``{}``."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""
