"""FedYogi: Yogi as the server optimizer on the clients' mean update.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2 (FEDYOGI).
https://arxiv.org/abs/2003.00295

With ``delta = mean - global``: ``m = beta1 * m + (1 - beta1) * delta`` (``m`` starts at 0),
``v = v - (1 - beta2) * delta**2 * sign(v - delta**2)`` (additive: ``v`` moves towards
``delta**2`` by at most ``(1 - beta2) * delta**2`` a step, where Adam's ``v`` decays
multiplicatively);
``v`` starts at ``tau**2`` (Algorithm 2 initialises ``v_{-1} >= tau**2``), and
``new = global + server_lr * m / (sqrt(v) + tau)``.
"""

from __future__ import annotations

import torch

from fedpeft.aggregators.base import AGGREGATORS
from fedpeft.aggregators.fedadam import FedAdam


@AGGREGATORS.register("fedyogi")
class FedYogi(FedAdam):
    """Federated averaging with a server-side Yogi step: FedAdam's parameters and first moment,
    Yogi's additive second moment (``v`` moves towards ``delta**2`` by at most ``(1 - beta2) * delta**2``)."""

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v - (1.0 - self.beta2) * delta_sq * torch.sign(v - delta_sq)
