"""Aggregation plugins written for KubeEdge Ianvs / sedna, run as fedpeft aggregators.

Ianvs's ``fedllm-peft`` example ships ``algorithm/FedAvg-PEFT.py`` and ``FedAvgM-PEFT.py``: a
class registered with ``ClassFactory.register(ClassType.FL_AGG, "FedAvg-PEFT")``, deriving
sedna's ``BaseAggregation``, whose ``aggregate(clients)`` reads each client's ``weights`` (a dict
of adapter tensors by parameter name) and ``num_samples`` and returns the new weights, keeping
what it needs between rounds on itself (``self.weights``, FedAvgM's ``self.moments``).

:func:`ianvs_aggregator` wraps such a class (one with ``aggregate`` and no ``step``) in an
adapter class with the plugin's own ``__init__`` signature, so its hyperparameters are checked
like any aggregator's. The adapter gives the plugin every client's update when the server sees
them (:func:`fedpeft.aggregators.base.aggregate` calls :meth:`IanvsAggregation.step_updates`);
under secure aggregation the server sees only their weighted mean, which the plugin then gets as
one client (exact for a rule that depends on the clients only through that mean, as both seed
files do after their first round). The plugin's attributes are its checkpointed state, so a
resumed run continues exactly.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedpeft.aggregators.base import as_float32, check_state, check_updates
from fedpeft.errors import AggregationError
from fedpeft.state import ClientUpdate, State


@dataclass
class AggClient:
    """What an Ianvs aggregation reads of a client (sedna's ``AggClient``)."""

    weights: State
    num_samples: int


def _portable(value: Any) -> Any:
    """``value`` as checkpoint-safe data (``torch.load(weights_only=True)``): tensors copied."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_portable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise AggregationError(f"cannot checkpoint an attribute of type {type(value).__name__} of an Ianvs "
                           "aggregation plugin; keep tensors, arrays, dicts, lists and numbers on self")


class IanvsAggregation:
    """fedpeft's aggregator protocol around an Ianvs aggregation object (``self.plugin``)."""

    plugin_class: type

    def __init__(self, **params: Any) -> None:
        self.plugin = self.plugin_class(**params)

    def step(self, global_state: State, mean_state: State) -> State:
        """The plugin on the clients' weighted mean, as one client (secure aggregation)."""
        check_state(global_state, mean_state, "the mean of the client updates")
        return self._aggregate(global_state, [AggClient(as_float32(mean_state), 1)])

    def step_updates(self, global_state: State, updates: list[ClientUpdate]) -> State:
        """The plugin on every client's update, as Ianvs runs it."""
        check_updates(global_state, updates)
        return self._aggregate(global_state, [AggClient(as_float32(u.state), u.num_examples) for u in updates])

    def _aggregate(self, global_state: State, clients: list[AggClient]) -> State:
        result = self.plugin.aggregate(clients)
        if not isinstance(result, dict):
            raise AggregationError(f"{self.plugin_class.__name__}.aggregate returned {type(result).__name__}; "
                                   "expected a dict of tensors by parameter name")
        new = {k: torch.as_tensor(v).detach().to("cpu", torch.float32) for k, v in result.items()}
        check_state(global_state, new, f"what {self.plugin_class.__name__}.aggregate returned")
        return new

    def state_dict(self) -> dict[str, Any]:
        """``{"plugin": the plugin's attributes}`` (``weights``, momentum, ...), copied."""
        return {"plugin": _portable(vars(self.plugin))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if "plugin" not in state:
            raise AggregationError(f"{self.plugin_class.__name__} state is missing 'plugin' (found {sorted(state)}); "
                                   "was the checkpoint written by a different aggregator?")
        for name, value in state["plugin"].items():
            setattr(self.plugin, name, _portable(value))


def ianvs_aggregator(obj: Any, name: str) -> Any:
    """``obj`` itself, or an :class:`IanvsAggregation` class for it when it is an Ianvs one.

    Args:
        obj: What an aggregation plugin file (or entry point) gave.
        name: The registry name, for the adapter's name.
    """
    if not inspect.isclass(obj) or not hasattr(obj, "aggregate") or hasattr(obj, "step"):
        return obj

    @functools.wraps(obj.__init__)  # the plugin's keywords are the adapter's hyperparameters
    def __init__(self: IanvsAggregation, **params: Any) -> None:
        IanvsAggregation.__init__(self, **params)

    return type(obj.__name__, (IanvsAggregation,), {"plugin_class": obj, "__init__": __init__,
                                                    "__doc__": obj.__doc__, "__module__": obj.__module__})
