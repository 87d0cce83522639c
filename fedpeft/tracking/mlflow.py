"""``tracking: [mlflow]``: one MLflow run per fedpeft run, in ``RUN_DIR/mlruns/`` or at ``tracking.mlflow_uri``.

Experiment = the job name, run name = the run id (the folder's name), parameters = the resolved
config by dotted key (``federation.rounds``), metrics = every number of every record at step =
round (:func:`fedpeft.tracking.scalars`; characters MLflow refuses in a key become ``_``).

No server is needed: by default the run goes to MLflow's file store inside the run folder.
MLflow 3 keeps that store in maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE``
is true, which this backend sets for a file store (unless the environment sets it). View it with
the full ``mlflow`` package: ``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri
RUN_DIR/mlruns``. ``tracking.mlflow_uri`` takes any tracking URI: a folder, ``sqlite:///runs.db``
(needs sqlalchemy and alembic), ``http://host:5000``. MLflow's usage telemetry is off
(``MLFLOW_DISABLE_TELEMETRY``) unless the environment turns it on.

A resumed run logs on into the same MLflow run (its id is kept in ``RUN_DIR/mlflow_run.json``).
MLflow can neither replace a logged point nor change a parameter, so a step the run already
holds (a round logged before a kill, then trained again after ``--resume``) keeps the first
attempt's values (the new ones are skipped: one value per step), and a parameter changed on
resume (``--allow-config-change``) keeps its first value there; both are said in the log.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from fedpeft.io_utils import write_json
from fedpeft.tracking import (
    MLFLOW_RUN_FILE,
    MLRUNS_DIR,
    TRACKERS,
    require,
    scalars,
    step_of,
)

if TYPE_CHECKING:
    from fedpeft.tracking.settings import TrackingConfig

log = logging.getLogger(__name__)

TAG_RUN_DIR = "fedpeft.run_dir"
MAX_METRICS_PER_BATCH = 1000  # MLflow's limits of one log_batch call
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_VALUE_CHARS = 6000
_BAD_KEY_CHARS = re.compile(r"[^\w./\- ]")  # MLflow keys: letters, digits, _ . / - and space


@TRACKERS.register("mlflow")
class MlflowTracker:
    """Metrics and parameters into one MLflow run (see the module docstring)."""

    requires = (("mlflow", "mlflow-skinny"),)

    def __init__(self, settings: TrackingConfig) -> None:
        self._uri_setting = settings.mlflow_uri
        self._client: Any = None
        self._run_id = ""
        self._stored: dict[str, set[int] | None] | None = None  # resumed: key -> steps MLflow holds

    def start(self, run_dir: Path, config: dict[str, Any], first_step: int) -> None:
        uri = self._uri_setting or (run_dir / MLRUNS_DIR).resolve().as_uri()
        if urlparse(uri).scheme in ("", "file"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        self._client = require("mlflow.tracking", "mlflow-skinny", "mlflow").MlflowClient(uri)
        run = self._resumed_run(run_dir)
        if run is None:
            run = self._new_run(run_dir, config, uri)
        else:
            self._stored = dict.fromkeys(run.data.metrics)  # each key's steps read when first needed
        self._run_id = run.info.run_id
        self._log_params(config, dict(run.data.params))
        log.info("tracking: MLflow run %s (%s) at %s", self._run_id, run_dir.name, uri)

    def log(self, record: dict[str, Any]) -> None:
        step = step_of(record)
        values = {_key(k): v for k, v in scalars(record).items()}
        held = [k for k in values if self._holds(k, step)]
        if held:
            log.warning("MLflow already holds round %d of this run (logged before it was resumed): it keeps "
                        "those values (MLflow cannot replace a point); metrics.jsonl has the new ones", step)
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items() if k not in held]
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self._client.log_batch(self._run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])

    def close(self, finished: bool) -> None:
        if self._client is not None:
            self._client.set_terminated(self._run_id, "FINISHED" if finished else "KILLED")
            self._client = None

    def _resumed_run(self, run_dir: Path) -> Any:
        """The MLflow run an earlier process of this run folder logged to, or None."""
        from mlflow.exceptions import MlflowException

        saved = run_dir / MLFLOW_RUN_FILE
        if not saved.is_file():
            return None
        info = json.loads(saved.read_text(encoding="utf-8"))
        if info.get("mlflow_uri") != self._uri_setting:
            log.warning("tracking.mlflow_uri changed since this run started; logging to a new MLflow run")
            return None
        try:
            run = self._client.get_run(info["run_id"])
        except MlflowException as e:
            log.warning("MLflow run %s of %s is gone (%s); logging to a new one", info["run_id"], run_dir, e)
            return None
        self._client.update_run(run.info.run_id, status="RUNNING")
        return run

    def _new_run(self, run_dir: Path, config: dict[str, Any], uri: str) -> Any:
        from mlflow.exceptions import MlflowException

        name = str(config.get("job") or run_dir.parent.name)
        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = self._client.create_experiment(name)
            except MlflowException:  # another run created it meanwhile
                experiment_id = self._client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = experiment.experiment_id
        run = self._client.create_run(experiment_id, run_name=run_dir.name,
                                      tags={TAG_RUN_DIR: str(run_dir.resolve())})
        write_json(run_dir / MLFLOW_RUN_FILE, {"mlflow_uri": self._uri_setting, "tracking_uri": uri,
                                               "experiment_id": experiment_id, "run_id": run.info.run_id})
        return run

    def _log_params(self, config: dict[str, Any], logged: dict[str, str]) -> None:
        """The config as parameters; on resume only those not logged yet (MLflow's are fixed)."""
        from mlflow.entities import Param

        from fedpeft.config import flatten

        params = {_key(k)[:250]: _param_value(v) for k, v in flatten(config).items()}
        changed = [k for k, v in params.items() if k in logged and logged[k] != v]
        if changed:
            log.warning("MLflow keeps the parameters a run started with; changed on resume: %s",
                        ", ".join(f"{k} {logged[k]} -> {params[k]}" for k in changed))
        todo = [Param(k, v) for k, v in params.items() if k not in logged]
        for i in range(0, len(todo), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self._run_id, params=todo[i:i + MAX_PARAMS_PER_BATCH])

    def _holds(self, key: str, step: int) -> bool:
        """Whether the (resumed) MLflow run already has a point of ``key`` at ``step``."""
        if self._stored is None or key not in self._stored:
            return False
        steps = self._stored[key]
        if steps is None:
            steps = self._stored[key] = {m.step for m in self._client.get_metric_history(self._run_id, key)}
        return step in steps


def _key(name: str) -> str:
    """``name`` as an MLflow key: refused characters and path-like parts (``..``) become ``_``."""
    parts = _BAD_KEY_CHARS.sub("_", name).split("/")
    return "/".join(p if p not in ("", ".", "..") else "_" for p in parts)


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= MAX_PARAM_VALUE_CHARS else text[:MAX_PARAM_VALUE_CHARS - 1] + "…"
