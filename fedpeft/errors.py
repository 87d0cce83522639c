"""Domain exceptions. Each message says what was expected, what was found, and how to fix it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class FedPeftError(Exception):
    """Base class of every error fedpeft raises on purpose."""


class ConfigError(FedPeftError):
    """A configuration file or override is invalid.

    Attributes:
        problems: The :class:`fedpeft.problems.Problem` objects when the message lists several
            (see :meth:`fedpeft.problems.Problems.raise_if_any`); empty otherwise.
    """

    def __init__(self, message: str, problems: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


class DataError(FedPeftError):
    """A data file or partition is unusable."""


class AggregationError(FedPeftError):
    """Client updates cannot be aggregated (mismatched keys, shapes, or no updates)."""


class ModelError(FedPeftError):
    """A model cannot be resolved or loaded."""


class RoundError(FedPeftError):
    """A federated round could not complete (too few clients succeeded)."""


class RegistryError(FedPeftError, KeyError):
    """An unknown name was looked up in a registry."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class TrainingError(FedPeftError):
    """A client's local training went wrong (e.g. a non-finite loss)."""


class CheckpointError(FedPeftError):
    """No checkpoint can be trusted, or a run cannot be resumed as it was started."""


class RunInterrupted(FedPeftError):
    """The user stopped a run (Ctrl-C); the message says where it can be resumed from."""
