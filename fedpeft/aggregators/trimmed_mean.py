"""Coordinate-wise trimmed mean: per parameter, drop the largest and smallest values, average the rest.

Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018. https://arxiv.org/abs/1803.01498

``trim`` is the fraction of clients cut from *each* end, per coordinate: ``k = floor(trim x n)``
values below and above, then the plain mean of the ``n - 2k`` left (unweighted, as in the paper).
Tolerates up to ``k`` faulty clients. With ``k = 0`` (few clients) it is the unweighted mean, and
the round logs that nothing was trimmed. It reads every update, so the server holds them all for
the round (no streaming) and it cannot run under secure aggregation (a config error).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from fedpeft.aggregators.base import AGGREGATORS, refuse_mean, require_in_range, stacked
from fedpeft.state import ClientUpdate, State

log = logging.getLogger(__name__)


@AGGREGATORS.register("trimmed_mean")
class TrimmedMean:
    """Coordinate-wise trimmed mean.

    Args:
        trim: Fraction of the round's clients cut from each end, in [0, 0.5).
    """

    individual_updates = True  # secure aggregation (mean only) is a config error


    def __init__(self, trim: float = 0.2) -> None:
        require_in_range("trim", trim, 0.0, 0.5)
        self.trim = trim

    def step_updates(self, global_state: State, updates: list[ClientUpdate]) -> State:
        """The trimmed mean of ``updates``' states (float32)."""
        n = len(updates)
        k = math.floor(self.trim * n)
        if k == 0:
            log.warning("trimmed_mean: trim=%g of %d clients cuts none (needs >= %d clients): the plain mean this "
                        "round", self.trim, n, math.ceil(1 / self.trim) if self.trim else 0)
        return {key: stacked(updates, key, torch.float32).sort(dim=0).values[k:n - k].double().mean(dim=0)
                .to(torch.float32) for key in global_state}

    def step(self, global_state: State, mean_state: State) -> State:
        """Refused: the trimmed mean needs each update (see the module doc)."""
        raise refuse_mean("trimmed_mean")

    def state_dict(self) -> dict[str, Any]:
        """No server state: ``{}``."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""
