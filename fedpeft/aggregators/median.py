"""Coordinate-wise median: each parameter of the new global adapter is the median of the clients'.

Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018. https://arxiv.org/abs/1803.01498

Robust to fewer than half of the clients sending anything at all (a scaled, NaN-free garbage
update moves no coordinate past the honest clients' range). Unweighted: ``num_examples`` is
ignored, as in the paper (weighting would let a site claiming many examples win). With an even
number of clients the median is the mean of the two middle values. It reads every update, so
the server holds them all for the round (it cannot stream; the round logs the memory) and it
cannot run under secure aggregation (a config error).
"""

from __future__ import annotations

from typing import Any

import torch

from fedpeft.aggregators.base import AGGREGATORS, refuse_mean, stacked
from fedpeft.state import ClientUpdate, State


@AGGREGATORS.register("median")
class Median:
    """Coordinate-wise median of the client updates; no hyperparameters, no server state."""

    individual_updates = True  # secure aggregation (mean only) is a config error


    def step_updates(self, global_state: State, updates: list[ClientUpdate]) -> State:
        """The coordinate-wise median of ``updates``' states (float32)."""
        return {key: _median(stacked(updates, key, torch.float32)).to(torch.float32) for key in global_state}

    def step(self, global_state: State, mean_state: State) -> State:
        """Refused: the median needs each update (see the module doc)."""
        raise refuse_mean("median")

    def state_dict(self) -> dict[str, Any]:
        """No server state: ``{}``."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""


def _median(values: torch.Tensor) -> torch.Tensor:
    """Median over dim 0 of ``(clients, *shape)``; the mean of the two middle values when even."""
    ordered = values.sort(dim=0).values  # exact in the input's dtype
    n = ordered.shape[0]
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1].double() + ordered[n // 2].double()) / 2
