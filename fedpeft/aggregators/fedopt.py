"""The server optimizer shared by FedAdam, FedYogi and FedAdagrad: each subclasses it and gives
only its second-moment rule (:meth:`AdaptiveServerOptimizer.second_moment`).

Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2.
https://arxiv.org/abs/2003.00295

With ``delta = mean - global`` (the negated pseudo-gradient), every variant keeps the first
moment ``m = beta1 * m + (1 - beta1) * delta`` (``m`` starts at 0) and a second moment ``v``
whose update rule is the only difference between the three; ``v`` starts at ``tau**2``
(Algorithm 2 initialises ``v_{-1} >= tau**2``). The new global state is
``global + server_lr * m / (sqrt(v) + tau)``.
"""

from __future__ import annotations

from typing import Any

import torch

from fedpeft.aggregators.base import (
    as_float32,
    check_state,
    clone_state,
    require_in_range,
    require_state_keys,
    zeros_like_state,
)
from fedpeft.state import State

class AdaptiveServerOptimizer:
    """The moments ``m``, ``v`` and the step count of one FedOpt server optimizer.

    Args:
        server_lr: Server learning rate ``eta`` (> 0).
        beta1: First-moment decay in [0, 1).
        tau: Adaptivity ``tau`` (> 0): the initial ``sqrt(v)`` and the denominator's floor.

    Raises:
        ConfigError: if a hyperparameter is out of range.
    """

    def __init__(
        self, *, server_lr: float, beta1: float, tau: float,
    ) -> None:
        require_in_range("server_lr", server_lr, 0.0)
        require_in_range("beta1", beta1, 0.0, 1.0)
        require_in_range("tau", tau, 0.0)
        self.owner = type(self).__name__  # for error messages
        self.server_lr, self.beta1, self.tau = float(server_lr), float(beta1), float(tau)
        self._m: State | None = None
        self._v: State | None = None
        self._steps = 0

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        """``v`` from ``v_prev`` and ``delta ** 2``, elementwise on float32 tensors (per variant)."""
        raise NotImplementedError

    def step(self, global_state: State, mean_state: State) -> State:
        """One adaptive step from the sent ``global_state`` towards ``mean_state``.

        Returns:
            The new global state (new tensors; the inputs are not modified).

        Raises:
            AggregationError: if the keys or shapes of the inputs or the moments differ.
        """
        check_state(global_state, mean_state, "the mean of the client updates")
        current, mean = as_float32(global_state), as_float32(mean_state)
        m_prev, v_prev = self._previous_moments(current)
        new: State = {}
        m: State = {}
        v: State = {}
        for k in current:
            delta = mean[k] - current[k]
            m[k] = self.beta1 * m_prev[k] + (1.0 - self.beta1) * delta
            v[k] = self.second_moment(v_prev[k], delta * delta)
            new[k] = current[k] + self.server_lr * m[k] / (v[k].sqrt() + self.tau)
        self._m, self._v = m, v
        self._steps += 1
        return new

    def _previous_moments(self, current: State) -> tuple[State, State]:
        if self._m is None or self._v is None:
            m0 = zeros_like_state(current)
            v0 = {k: torch.full_like(t, self.tau**2) for k, t in m0.items()}
            return m0, v0
        check_state(current, self._m, f"the {self.owner} first moment m")
        check_state(current, self._v, f"the {self.owner} second moment v")
        return self._m, self._v

    def state_dict(self) -> dict[str, Any]:
        """``{"m": State | None, "v": State | None, "step": int}`` with cloned tensors."""
        return {
            "m": None if self._m is None else clone_state(self._m),
            "v": None if self._v is None else clone_state(self._v),
            "step": self._steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (tensors are copied).

        Raises:
            AggregationError: if ``state`` lacks ``m``, ``v`` or ``step``.
        """
        require_state_keys(state, ["m", "v", "step"], self.owner)
        self._m = None if state["m"] is None else clone_state(state["m"])
        self._v = None if state["v"] is None else clone_state(state["v"])
        self._steps = int(state["step"])
