"""The ``tracking`` section of a job (:class:`fedpeft.config.JobConfig` holds it).

::

    tracking: [tensorboard, mlflow]          # short for: tracking: {backends: [...]}
    tracking:
      backends: [mlflow]
      mlflow_uri: sqlite:///mlflow.db        # default: the file store RUN_DIR/mlruns
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from fedpeft.errors import RegistryError
from fedpeft.tracking import TRACKERS


class TrackingConfig(BaseModel):
    """Where a run's records go besides ``metrics.jsonl`` (see :mod:`fedpeft.tracking`).

    ``backends``: registered tracker names (``tensorboard``: ``RUN_DIR/tensorboard/``;
    ``mlflow``: an MLflow run), a plugin ``path/to/file.py:Class``, or an entry point of group
    ``fedpeft.trackers``; empty (the default): none. ``mlflow_uri``: the MLflow tracking URI or
    folder (default: the file store ``RUN_DIR/mlruns``). The libraries are an extra:
    ``pip install 'fedpeft[tracking]'``.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    backends: list[str] = []
    mlflow_uri: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: Any) -> Any:
        return {"backends": data} if isinstance(data, list) else data

    @field_validator("backends")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        for name in names:
            try:
                TRACKERS.get(name)
            except RegistryError as e:
                raise ValueError(str(e)) from None
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"{', '.join(map(repr, twice))} listed more than once; list each backend once")
        return names

    @model_validator(mode="after")
    def _uri_needs_mlflow(self) -> TrackingConfig:
        if self.mlflow_uri is not None and "mlflow" not in [n.lower() for n in self.backends]:
            raise ValueError(f"mlflow_uri is set ({self.mlflow_uri!r}) but 'mlflow' is not among the backends "
                             f"{self.backends}; add it (tracking.backends: [..., mlflow]) or drop mlflow_uri")
        return self
