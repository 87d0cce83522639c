"""Norm-bounded FedAvg: each client's delta is clipped to an L2 norm, then the weighted mean.

Sun, Kairouz, Suresh and McMahan, "Can You Really Backdoor Federated Learning?", 2019.
https://arxiv.org/abs/1911.07963

``delta = client - global`` is scaled by ``min(1, max_norm / ||delta||)`` (norm over every tensor
of the adapter together), so no site moves the average by more than ``max_norm x its weight
share``. Unlike ``federation.max_update_norm``, which drops an update above the bound, this keeps
it, clipped. It works on each update as it arrives, so it streams (O(1) updates held); under
secure aggregation the server cannot clip, so it is a config error there (sites clip themselves
with client-level DP's ``clip_norm``).
"""

from __future__ import annotations

from typing import Any

import torch

from fedpeft.aggregators.base import AGGREGATORS, require_in_range
from fedpeft.aggregators.fedavg import FedAvg
from fedpeft.state import State
from fedpeft.update_checks import delta_norm


@AGGREGATORS.register("norm_bounded")
class NormBounded:
    """FedAvg over updates whose delta is clipped to ``max_norm``.

    Args:
        max_norm: L2 bound on each client's delta over the whole adapter (> 0).
    """

    individual_updates = True  # secure aggregation (mean only) is a config error


    def __init__(self, max_norm: float = 1.0) -> None:
        require_in_range("max_norm", max_norm, 0.0)
        self.max_norm = max_norm

    def prepare(self, global_state: State, client_state: State) -> State:
        """``client_state`` with its delta from ``global_state`` clipped to ``max_norm``."""
        norm = delta_norm(global_state, client_state)
        if norm <= self.max_norm:
            return client_state
        scale = self.max_norm / norm
        return {k: (g.double() + (client_state[k].double() - g.double()) * scale).to(torch.float32)
                for k, g in global_state.items()}

    def step(self, global_state: State, mean_state: State) -> State:
        """The mean of the clipped updates is the new global state (FedAvg's step)."""
        return FedAvg().step(global_state, mean_state)

    def state_dict(self) -> dict[str, Any]:
        """No server state: ``{}``."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""
