"""Server aggregation rules, one file each, registered by name in :data:`AGGREGATORS`.

Every aggregator implements :class:`Aggregator`, a server step ``step(global_state, mean_state)``;
:func:`aggregate` (the only caller) feeds it the clients' sample-weighted mean, which is what
secure aggregation reveals. A config names one with
``federation.aggregation.name`` and gives its ``__init__`` keyword arguments as hyperparameters.
"""

from __future__ import annotations

from typing import Any

# Importing each module registers its class in AGGREGATORS.
from fedpeft.aggregators import (  # noqa: F401
    fedadagrad, fedadam, fedavg, fedavgm, fedyogi, median, norm_bounded, svd, trimmed_mean,
)
from fedpeft.aggregators.base import (
    AGGREGATORS, Aggregator, aggregate, check_updates, needs_every_update, weighted_mean,
)
from fedpeft.aggregators.fedadagrad import FedAdagrad
from fedpeft.aggregators.fedadam import FedAdam
from fedpeft.aggregators.fedavg import FedAvg
from fedpeft.aggregators.fedavgm import FedAvgM
from fedpeft.aggregators.fedyogi import FedYogi
from fedpeft.params import instantiate

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "aggregate",
    "build_aggregator",
    "check_updates",
    "needs_every_update",
    "weighted_mean",
]


def build_aggregator(name: str, params: dict[str, Any]) -> Aggregator:
    """Construct the aggregator registered as ``name`` with hyperparameters ``params``.

    Args:
        name: A registered name (``"fedavgm"``), a ``path/file.py:Class`` plugin or an entry
            point in group ``fedpeft.aggregators``.
        params: Keyword arguments of the class's ``__init__`` (from YAML; coerced to its types).

    Returns:
        The aggregator instance.

    Raises:
        RegistryError: if ``name`` is unknown (the message lists the valid names).
        ConfigError: if ``params`` has unknown keys, wrong types or out-of-range values.
    """
    return instantiate(AGGREGATORS, name, params, "aggregator")
