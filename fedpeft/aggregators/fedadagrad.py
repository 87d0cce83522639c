"""FedAdagrad: Adagrad (with momentum) as the server optimizer on the clients' mean update.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2 (FEDADAGRAD).
https://arxiv.org/abs/2003.00295

With ``delta = mean - global``: ``m = beta1 * m + (1 - beta1) * delta`` (``m`` starts at 0),
``v = v + delta**2``;
``v`` starts at ``tau**2`` (Algorithm 2 initialises ``v_{-1} >= tau**2``), and
``new = global + server_lr * m / (sqrt(v) + tau)``.

Algorithm 2 applies the first-moment momentum ``beta1`` to all three variants, FedAdagrad
included, so FedAdagrad takes ``beta1`` (``beta1 = 0`` gives plain Adagrad) but no ``beta2``.
"""

from __future__ import annotations

import torch

from fedpeft.aggregators.base import AGGREGATORS
from fedpeft.aggregators.fedopt import AdaptiveServerOptimizer


@AGGREGATORS.register("fedadagrad")
class FedAdagrad(AdaptiveServerOptimizer):
    """Federated averaging with a server-side Adagrad step.

    Args:
        server_lr: Server learning rate ``eta`` (> 0).
        beta1: First-moment (momentum) decay in [0, 1).
        tau: Adaptivity ``tau`` (> 0); larger values make steps less adaptive.

    Raises:
        ConfigError: if a hyperparameter is out of range.
    """

    def __init__(self, server_lr: float = 1e-2, beta1: float = 0.9, tau: float = 1e-3) -> None:
        super().__init__(server_lr=server_lr, beta1=beta1, tau=tau)

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v + delta_sq
