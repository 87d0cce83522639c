"""Label-skewed partition: per-label client proportions drawn from a symmetric Dirichlet.

Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification", 2019. https://arxiv.org/abs/1909.06335

Hsu et al. control non-IID-ness with the Dirichlet concentration ``alpha``. As in most FL code
(e.g. Yurochkin et al. 2019, Flower Datasets' ``DirichletPartitioner``), proportions are drawn
per label: for each value ``y`` of ``field``, ``p ~ Dir(alpha * 1_K)`` over the ``K`` clients and
the rows labelled ``y`` are shuffled and cut in those proportions. Small ``alpha`` (0.1) gives
each client few labels; large ``alpha`` (100) approaches IID. Sizes are unequal by design.
"""

from __future__ import annotations

import numpy as np

from fedpeft.data.io import field_values
from fedpeft.data.partitioners import PARTITIONERS
from fedpeft.errors import ConfigError


@PARTITIONERS.register("dirichlet")
class Dirichlet:
    """Dirichlet label skew over the values of one field.

    Args:
        field: Row field whose values are the labels (``qtype`` in the sample data).
        alpha: Dirichlet concentration (> 0); smaller is more skewed.

    Raises:
        ConfigError: if ``alpha`` is not positive or ``field`` is empty.
    """

    def __init__(self, field: str = "qtype", alpha: float = 0.5) -> None:
        if not alpha > 0:
            raise ConfigError(f"dirichlet: `alpha` must be > 0, got {alpha}")
        if not field:
            raise ConfigError("dirichlet: `field` must name a row field, got an empty string")
        self.field = field
        self.alpha = float(alpha)

    def partition(self, rows: list[dict], num_clients: int, seed: int) -> list[list[int]]:
        """Row indices of each client (each sorted); every row goes to exactly one client.

        Raises:
            DataError: if a row lacks ``field``.
        """
        labels = field_values(rows, self.field, hint="Set federation.partition.field to a field every row has.")
        by_label: dict[object, list[int]] = {}
        for i, label in enumerate(labels):
            by_label.setdefault(label, []).append(i)
        rng = np.random.default_rng(seed)
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for label in sorted(by_label, key=str):  # fixed label order: same seed, same partition
            idx = np.array(by_label[label])
            rng.shuffle(idx)
            proportions = rng.dirichlet(np.full(num_clients, self.alpha))
            cuts = np.round(np.cumsum(proportions)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(int(i) for i in chunk)
        return [sorted(p) for p in parts]
