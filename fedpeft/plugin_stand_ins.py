"""Stand-ins for what KubeEdge Ianvs plugin files import, present only while such a file loads.

Ianvs metric and aggregation files (``examples/federated-llm/fedllm-peft``) start with::

    from sedna.common.class_factory import ClassFactory, ClassType
    from sedna.algorithms.aggregation.aggregation import BaseAggregation
    from core.common.log import LOGGER  # Ianvs's own package

and register what they define with ``@ClassFactory.register(ClassType.GENERAL, alias="bleu4_metric")``
(metrics) or ``ClassFactory.register(ClassType.FL_AGG, "FedAvg-PEFT")`` (aggregations). fedpeft
needs neither sedna nor Ianvs installed: :func:`stand_ins` puts a finder at the *end* of
``sys.meta_path``, so it serves these modules only when no real one is found, and afterwards
removes every module it served from ``sys.modules``. The file keeps the objects it imported.

The stand-ins copy the parts of sedna's API these files use (kubeedge/sedna
``lib/sedna/common/class_factory.py``, ``lib/sedna/algorithms/aggregation/aggregation.py``):
``ClassFactory.register(type_name, alias)``, ``register_cls``, ``is_exists``, ``get_cls`` and the
``ClassType`` constants; ``BaseAggregation`` (``total_size``, ``weights``, abstract
``aggregate(clients)``) and ``AggClient``; Ianvs's ``LOGGER`` is the ``ianvs`` logger.
"""

from __future__ import annotations

import abc
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

CLASS_FACTORY_MODULE = "sedna.common.class_factory"
_PACKAGES = ("sedna", "sedna.common", "sedna.algorithms", "sedna.algorithms.aggregation", "core", "core.common")
_LOCK = threading.RLock()


class ClassType:
    """sedna's registry type names (the values are sedna's)."""

    GENERAL = "general"
    HEM = "hard_example_mining"
    FL_AGG = "aggregation"
    MTL = "multi_task_learening"  # sic, as sedna spells it
    UTD = "unseen_task_detect"
    OF = "optical_flow"
    ALGORITHM = "algorithm"
    DATASET = "data_process"
    CALLBACK = "post_process_callback"
    UTP = "unseen_task_processing"
    KM = "knowledge_management"
    STP = "seen_task_processing"


def _class_factory() -> type:
    """A fresh ``ClassFactory`` (own registry: two plugin files may both register ``FedAvg``)."""

    class ClassFactory:
        """sedna's ``ClassFactory``: ``{type_name: {alias or __name__: object}}``."""

        __registry__: dict[str, dict[str, Any]] = {}

        @classmethod
        def register(cls, type_name: str = ClassType.GENERAL, alias: str | None = None) -> Callable:
            return lambda obj: cls.register_cls(obj, type_name, alias)

        @classmethod
        def register_cls(cls, t_cls: Any, type_name: str = ClassType.GENERAL, alias: str | None = None) -> Any:
            cls.__registry__.setdefault(type_name, {})[alias if alias is not None else t_cls.__name__] = t_cls
            return t_cls

        @classmethod
        def is_exists(cls, type_name: str, cls_name: str | None = None) -> bool:
            return type_name in cls.__registry__ and (cls_name is None or cls_name in cls.__registry__[type_name])

        @classmethod
        def get_cls(cls, type_name: str, t_cls_name: str | None = None) -> Any:
            if t_cls_name is None or not cls.is_exists(type_name, t_cls_name):
                raise ValueError(f"can't find class type {type_name} class name {t_cls_name} in class registry")
            return cls.__registry__[type_name][t_cls_name]

    return ClassFactory


class AggClient:
    """What sedna passes an aggregation: ``num_samples`` and ``weights``."""

    num_samples: int
    weights: Any


class BaseAggregation(metaclass=abc.ABCMeta):
    """sedna's aggregation base class: ``self.weights`` persists between rounds."""

    def __init__(self) -> None:
        self.total_size = 0
        self.weights = None

    @abc.abstractmethod
    def aggregate(self, clients: list[AggClient]) -> Any:
        """The new weights from every client's ``weights`` and ``num_samples``."""


def _fill(name: str, module: ModuleType) -> None:
    if name == CLASS_FACTORY_MODULE:
        module.ClassFactory, module.ClassType = _class_factory(), ClassType
    elif name == "sedna.algorithms.aggregation.aggregation":
        module.BaseAggregation, module.AggClient = BaseAggregation, AggClient
    elif name == "core.common.log":
        module.LOGGER = logging.getLogger("ianvs")


_MODULES = (*_PACKAGES, CLASS_FACTORY_MODULE, "sedna.algorithms.aggregation.aggregation", "core.common.log")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the stand-in modules that no other finder found, and remembers which."""

    def __init__(self) -> None:
        self.served: list[str] = []

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=fullname in _PACKAGES)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # the default module

    def exec_module(self, module: ModuleType) -> None:
        _fill(module.__name__, module)
        self.served.append(module.__name__)


def _unload(names: list[str]) -> None:
    """Forget the served modules, and the attributes the import system set on their parents."""
    for name in reversed(names):
        module = sys.modules.pop(name, None)
        parent_name, _, child = name.rpartition(".")
        parent = sys.modules.get(parent_name)
        if parent is not None and module is not None and getattr(parent, child, None) is module:
            delattr(parent, child)


def registrations() -> dict[str, dict[str, Any]]:
    """A copy of the loaded ``ClassFactory``'s registry (real or stand-in); empty if none is loaded."""
    module = sys.modules.get(CLASS_FACTORY_MODULE)
    registry = getattr(getattr(module, "ClassFactory", None), "__registry__", None)
    return {t: dict(items) for t, items in registry.items()} if isinstance(registry, dict) else {}


@contextmanager
def stand_ins() -> Iterator[dict[str, dict[str, Any]]]:
    """Serve the stand-ins while the ``with`` body imports a plugin file.

    Yields:
        A dict filled on exit with what the body registered through ``ClassFactory``
        (``{type_name: {alias: object}}``), through the real sedna if it is installed.
    """
    added: dict[str, dict[str, Any]] = {}
    with _LOCK:
        before = registrations()
        finder = _Finder()
        sys.meta_path.append(finder)
        try:
            yield added
        finally:
            for type_name, items in registrations().items():
                new = {k: v for k, v in items.items() if before.get(type_name, {}).get(k) is not v}
                if new:
                    added[type_name] = new
            sys.meta_path.remove(finder)
            _unload(finder.served)
