"""Run tracking: every ``metrics.jsonl`` record also goes to local TensorBoard and MLflow stores.

A job asks for it by name (``tracking: [tensorboard, mlflow]``, see
:class:`fedpeft.tracking.settings.TrackingConfig`). :class:`fedpeft.run_dir.RunDir` sends each
record it appends to ``metrics.jsonl`` to the run's :class:`Tracking`, which starts the trackers
at the first record (the library is imported only then) and closes them when the run writes its
summary or lets go of its folder. ``metrics.jsonl`` stays the record of truth; a tracker is a view.

What a tracker gets from a record (:func:`scalars`): every number, by ``/``-joined key, at step =
the record's ``round`` (0: the zero-shot evaluation)::

    train_loss, bytes_up, bytes_down, seconds, epsilon, privacy/noise_multiplier,
    eval/rougeL, eval/heldout_loss, clients/<client_id>/train_loss, sites/<client>/rougeL, ...

Strings and booleans are left out. The resolved config goes along once as parameters.

Backends (one file each, registered by name in :data:`TRACKERS`; a plugin is
``path/to/file.py:Class`` or an entry point in group ``fedpeft.trackers``):

* ``tensorboard``: event files in ``RUN_DIR/tensorboard/`` (``tensorboard --logdir RUN_DIR``).
* ``mlflow``: an MLflow run (experiment = job name, run name = run id) in the file store
  ``RUN_DIR/mlruns/`` or at ``tracking.mlflow_uri``.

A resumed run: a run killed after writing round ``k`` but before its checkpoint left round ``k``
in the stores; ``--resume`` drops it from ``metrics.jsonl`` and trains round ``k`` again. Each
tracker is told the step of the first record its process logs (``first_step``) and keeps one
value per step: TensorBoard hides what it held at ``first_step`` and later (``purge_step``),
so it shows the resumed values; MLflow cannot replace a logged point, so it keeps the first
attempt's values of those rounds and takes the resumed run's from the next new round on.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from fedpeft.constants import CONFIG_FILE, KEY_CLIENT_ID, KEY_EVENT, KEY_ROUND
from fedpeft.errors import ConfigError
from fedpeft.registry import Registry

if TYPE_CHECKING:
    from fedpeft.tracking.settings import TrackingConfig

log = logging.getLogger(__name__)

# Inside a run folder
TENSORBOARD_DIR = "tensorboard"
MLRUNS_DIR = "mlruns"  # the default MLflow file store
MLFLOW_RUN_FILE = "mlflow_run.json"  # which MLflow run a resumed run goes on logging to

TRACKING_KEY = "tracking"  # the job config's section
_NOT_SCALARS = (KEY_ROUND, KEY_EVENT)  # the step, and the kind of record
PIP_HINT = "pip install 'fedpeft[tracking]'"


class Tracker(Protocol):
    """A store of a run's numbers: built from the job's ``tracking`` settings, started once per
    process that logs, fed every record, closed at the end."""

    requires: tuple[tuple[str, str], ...]
    """``(module, pip package)`` pairs the backend imports when it starts."""

    def __init__(self, settings: TrackingConfig) -> None: ...

    def start(self, run_dir: Path, config: dict[str, Any], first_step: int) -> None:
        """Open the store. ``config``: the resolved job config (``config.yaml``). ``first_step``:
        the step of the first record this process logs; what the store already holds at that step
        or later was logged by an attempt that died before checkpointing it."""

    def log(self, record: dict[str, Any]) -> None:
        """Store one ``metrics.jsonl`` record (see :func:`scalars`, :func:`step_of`)."""

    def close(self, finished: bool) -> None:
        """Flush and close; ``finished``: the run wrote its summary (else it stopped early)."""


TRACKERS: Registry[type[Tracker]] = Registry("trackers")
"""Tracking backends by name (``tensorboard``, ``mlflow``); see :mod:`fedpeft.registry`."""


def step_of(record: Mapping[str, Any]) -> int:
    """The step a record is logged at: its round (0: before training)."""
    return int(record.get(KEY_ROUND, 0))


def scalars(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a ``metrics.jsonl`` record by ``/``-joined key.

    Nested mappings join their keys (``eval/rougeL``); a list of per-client entries is keyed by
    each entry's ``client_id`` (``clients/client-0/train_loss``); strings, booleans and other
    lists are left out, and so are ``round`` (the step) and ``event``.

    Args:
        record: One record, as :meth:`fedpeft.run_dir.RunDir.log_metrics` gets it.
        prefix: Prepended to every key (used in the recursion).

    Returns:
        ``{key: value}`` in the record's order.
    """
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if (not prefix and key in _NOT_SCALARS) or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[name] = float(value)
        elif isinstance(value, Mapping):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, list) and all(isinstance(v, Mapping) and KEY_CLIENT_ID in v for v in value):
            for entry in value:
                rest = {k: v for k, v in entry.items() if k != KEY_CLIENT_ID}
                out.update(scalars(rest, f"{name}/{entry[KEY_CLIENT_ID]}/"))
    return out


def require(module: str, package: str, backend: str) -> ModuleType:
    """Import ``module`` for ``backend``.

    Raises:
        ConfigError: naming the pip command, when the library is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(_missing(backend, package, str(e))) from None


def _missing(backend: str, package: str, why: str) -> str:
    return (f"tracking backend {backend!r} needs the package {package!r}, which is not installed ({why}); "
            f"install it with: {PIP_HINT} (or: pip install {package}), or drop {backend!r} from tracking")


class Tracking:
    """The trackers of one run folder, started at its first record.

    Args:
        run_dir: The run folder.
        settings: The job's ``tracking`` section; ``None``: read it from the folder's
            ``config.yaml`` (absent there: no tracking).
    """

    def __init__(self, run_dir: Path, settings: TrackingConfig | None = None) -> None:
        self.run_dir = Path(run_dir)
        self._settings = settings
        self._live: list[Tracker] | None = None

    def settings(self) -> TrackingConfig:
        """The settings given, or those of ``config.yaml``."""
        from fedpeft.tracking.settings import TrackingConfig

        if self._settings is None:
            self._settings = TrackingConfig.model_validate(self._config().get(TRACKING_KEY) or {})
        return self._settings

    def check(self) -> None:
        """Fail now, not at the first record, when a backend's library is not installed.

        Raises:
            ConfigError: naming the pip command.
        """
        for name in self.settings().backends:
            for module, package in TRACKERS.get(name).requires:
                if importlib.util.find_spec(module) is None:
                    raise ConfigError(_missing(name, package, f"no module named {module!r}"))

    def log(self, record: dict[str, Any]) -> None:
        """Send ``record`` to every tracker (started at the first record). A tracker that fails (its
        store's disk is full, say) is dropped with an error in the log: the run goes on, and
        ``metrics.jsonl``, written first, keeps every record."""
        if self._live is None:
            self._live = self._start(step_of(record))
        for name, tracker in list(self._live):
            self._guarded(name, tracker, "log", lambda: tracker.log(record))

    def close(self, finished: bool) -> None:
        """Close the trackers that started (idempotent)."""
        live, self._live = self._live or [], None
        for name, tracker in live:
            self._guarded(name, tracker, "close", lambda: tracker.close(finished), drop=False)

    def _start(self, first_step: int) -> list[tuple[str, Tracker]]:
        settings = self.settings()
        if not settings.backends:
            return []
        config = self._config()
        self._live = []
        for name in settings.backends:
            tracker = TRACKERS.get(name)(settings)
            self._live.append((name, tracker))
            self._guarded(name, tracker, "start", lambda: tracker.start(self.run_dir, config, first_step))
        return self._live

    def _guarded(self, name: str, tracker: Tracker, what: str, call, drop: bool = True) -> None:
        try:
            call()
        except ConfigError:  # its library is missing: the job asked for something this install lacks
            raise
        except Exception as e:  # noqa: BLE001  (a tracker is a convenience: never the reason a run dies)
            log.error("tracking: %s failed to %s (%s: %s); the run goes on without it, and %s keeps every record",
                      name, what, type(e).__name__, e, self.run_dir / "metrics.jsonl")
            if drop and self._live is not None:
                self._live = [(n, t) for n, t in self._live if t is not tracker]

    def _config(self) -> dict[str, Any]:
        path = self.run_dir / CONFIG_FILE
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
        return tree if isinstance(tree, dict) else {}


# The backends register themselves; neither imports its library before it starts.
from fedpeft.tracking import mlflow as _mlflow  # noqa: F401
from fedpeft.tracking import tensorboard as _tensorboard  # noqa: F401
