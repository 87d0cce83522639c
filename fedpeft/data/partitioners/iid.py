"""IID partition: a seeded shuffle cut into near-equal parts (the homogeneous baseline)."""

from __future__ import annotations

import numpy as np

from fedpeft.data.partitioners import PARTITIONERS


@PARTITIONERS.register("iid")
class IID:
    """Every client gets a uniformly random share; sizes differ by at most one row."""

    def __init__(self) -> None:
        pass

    def partition(self, rows: list[dict], num_clients: int, seed: int) -> list[list[int]]:
        """Row indices of each client (each sorted); every row goes to exactly one client."""
        order = np.random.default_rng(seed).permutation(len(rows))
        return [sorted(int(i) for i in chunk) for chunk in np.array_split(order, num_clients)]
