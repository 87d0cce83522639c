"""FedAvgM: server SGD with momentum on the pseudo-gradient ``global - weighted_mean``.

Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification", 2019. https://arxiv.org/abs/1909.06335

The momentum buffer follows ``torch.optim.SGD`` (no dampening): the first step sets
``buf = g``, later steps ``buf = beta * buf + g``; then ``new = global - server_lr * buf``.
With ``beta = 0`` and ``server_lr = 1`` this is FedAvg.
"""

from __future__ import annotations

from typing import Any

from fedpeft.aggregators.base import (
    AGGREGATORS,
    as_float32,
    check_state,
    clone_state,
    require_in_range,
    require_state_keys,
)
from fedpeft.state import State


@AGGREGATORS.register("fedavgm")
class FedAvgM:
    """Federated averaging with server momentum.

    Args:
        beta: Server momentum factor in [0, 1); 0 disables momentum.
        server_lr: Server learning rate (> 0) applied to the momentum buffer.

    Raises:
        ConfigError: if a hyperparameter is out of range.
    """

    def __init__(self, beta: float = 0.9, server_lr: float = 1.0) -> None:
        require_in_range("beta", beta, 0.0, 1.0)
        require_in_range("server_lr", server_lr, 0.0)
        self.beta = float(beta)
        self.server_lr = float(server_lr)
        self._momentum: State | None = None
        self._steps = 0

    def step(self, global_state: State, mean_state: State) -> State:
        """One SGD-with-momentum step from the sent ``global_state`` towards ``mean_state``.

        Args:
            global_state: The global state that was sent to the clients this round.
            mean_state: The clients' sample-weighted mean state.

        Returns:
            The new global state (new tensors; the inputs are not modified).

        Raises:
            AggregationError: if the keys or shapes of the inputs or the momentum buffer differ.
        """
        check_state(global_state, mean_state, "the mean of the client updates")
        current, mean = as_float32(global_state), as_float32(mean_state)
        grad = {k: current[k] - mean[k] for k in current}  # pseudo-gradient
        if self._momentum is None:
            buf = grad
        else:
            check_state(current, self._momentum, "the server momentum buffer")
            buf = {k: self.beta * self._momentum[k] + grad[k] for k in current}
        self._momentum = buf
        self._steps += 1
        return {k: current[k] - self.server_lr * buf[k] for k in current}

    def state_dict(self) -> dict[str, Any]:
        """``{"momentum": State | None, "step": int}`` with cloned tensors."""
        momentum = None if self._momentum is None else clone_state(self._momentum)
        return {"momentum": momentum, "step": self._steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (tensors are copied).

        Raises:
            AggregationError: if ``state`` lacks ``momentum`` or ``step``.
        """
        require_state_keys(state, ["momentum", "step"], "FedAvgM")
        momentum = state["momentum"]
        self._momentum = None if momentum is None else clone_state(momentum)
        self._steps = int(state["step"])
