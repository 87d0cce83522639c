"""The run directory ``workspace/<job>/<run-id>/`` and everything written into it (atomically)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import socket
from pathlib import Path

from filelock import FileLock, Timeout

from fedpeft.config import JobConfig, dump_config
from fedpeft.constants import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    FINAL_ADAPTER_DIR,
    ITEM_SCORES_FILE,
    ITEM_SCORES_ZERO_SHOT_FILE,
    KEY_ROUND,
    LATEST_CHECKPOINT_FILE,
    LOCK_FILE,
    LOCK_HOLDER_FILE,
    METRICS_FILE,
    PARTITIONS_FILE,
    PREDICTIONS_FILE,
    SUMMARY_FILE,
)
from fedpeft.errors import ConfigError
from fedpeft.io_utils import append_jsonl, write_json, write_jsonl, write_text
from fedpeft.tracking import Tracking
from fedpeft.tracking.settings import TrackingConfig

log = logging.getLogger(__name__)


class RunDir:
    """Paths and writers of one run's outputs.

    Every record :meth:`log_metrics` appends also goes to the run's trackers (TensorBoard,
    MLflow: :mod:`fedpeft.tracking`), started at the first record from the ``tracking`` section
    of ``config.yaml`` (or ``tracking``, when given) and closed by :meth:`write_summary` (the
    run's end) or :meth:`release`.

    Args:
        path: The run folder.
        tracking: The trackers to use instead of those ``config.yaml`` names.
    """

    def __init__(self, path: Path, tracking: TrackingConfig | None = None) -> None:
        self.path = Path(path)
        self._lock: FileLock | None = None
        self._tracking_settings = tracking
        self._tracking: Tracking | None = None

    @classmethod
    def create(cls, cfg: JobConfig) -> "RunDir":
        """A new run folder for ``cfg`` (run id: ``cfg.run_id`` or a timestamp), locked for this process.

        Raises:
            ConfigError: if the folder already holds a run, or another process writes into it.
        """
        run_id = cfg.run_id or dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        path = Path(cfg.workspace) / cfg.job / run_id
        try:
            path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as e:
            raise ConfigError(f"cannot make the run folder {path}: {e.filename} is a file, not a folder; "
                              "set workspace (or job / run_id) to name a folder") from None
        run = cls(path)
        run.acquire()
        if (path / CHECKPOINT_DIR).exists() or (path / METRICS_FILE).exists():
            run.release()
            raise ConfigError(f"{path} already holds a run; resume it with --resume {path}, or pick another run_id")
        write_text(run.config_file, dump_config(cfg))
        run._check_tracking(remove=True)
        return run

    @classmethod
    def open(cls, path: Path) -> "RunDir":
        """An existing run folder (``--resume``), locked for this process.

        Raises:
            ConfigError: if ``path`` is not a run folder, or another process writes into it.
        """
        if not (Path(path) / CONFIG_FILE).is_file():
            raise ConfigError(f"{path} is not a fedpeft run folder (no {CONFIG_FILE}); give the folder a run wrote, "
                              "e.g. workspace/<job>/<run-id>")
        run = cls(path)
        run.acquire()
        run._check_tracking(remove=False)
        return run

    def acquire(self) -> None:
        """Make this process the folder's only writer until :meth:`release` (or exit).

        Raises:
            ConfigError: naming the process that holds the folder.
        """
        lock = FileLock(self.path / LOCK_FILE)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            holder = (self.path / LOCK_HOLDER_FILE).read_text().strip() if (self.path / LOCK_HOLDER_FILE).is_file() else "?"
            raise ConfigError(f"{self.path} is in use by another fedpeft process ({holder}); wait for it to end, "
                              "or run with another run_id") from None
        write_text(self.path / LOCK_HOLDER_FILE,
                   f"pid {os.getpid()} on {socket.gethostname()} since {dt.datetime.now():%Y-%m-%d %H:%M:%S}")
        self._lock = lock

    def release(self) -> None:
        """Close the trackers; let another process write into the folder (idempotent)."""
        if self._tracking is not None:
            self._tracking.close(finished=False)
        if self._lock is not None:
            (self.path / LOCK_HOLDER_FILE).unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    def where_to_resume(self, command: str) -> str:
        """One line: the last checkpoint of this run and the command that goes on from it."""
        latest = self.path / CHECKPOINT_DIR / LATEST_CHECKPOINT_FILE
        if not latest.is_file():
            return f"no round of {self.path} was checkpointed yet; start the run again"
        return (f"the last checkpoint is {self.path / CHECKPOINT_DIR / latest.read_text().strip()}; "
                f"go on with: {command} {self.path}")

    def remove_if_untrained(self) -> None:
        """Delete a folder that a run created and left before its first checkpoint (nothing to resume)."""
        if not (self.path / CHECKPOINT_DIR).exists():
            self.release()
            shutil.rmtree(self.path, ignore_errors=True)
            log.info("removed %s: the run stopped before its first round was checkpointed", self.path)

    config_file = property(lambda self: self.path / CONFIG_FILE)
    metrics_file = property(lambda self: self.path / METRICS_FILE)
    predictions_file = property(lambda self: self.path / PREDICTIONS_FILE)
    adapter_dir = property(lambda self: self.path / FINAL_ADAPTER_DIR)

    @property
    def tracking(self) -> Tracking:
        """The run's trackers (none unless the job names some)."""
        if self._tracking is None:
            self._tracking = Tracking(self.path, self._tracking_settings)
        return self._tracking

    def _check_tracking(self, remove: bool) -> None:
        """Fail before training when a tracking library is missing (``remove``: the new folder too)."""
        try:
            self.tracking.check()
        except ConfigError:
            if remove:
                self.remove_if_untrained()
            else:
                self.release()
            raise

    def log_metrics(self, record: dict) -> None:
        """Append one record to ``metrics.jsonl`` and send it to the run's trackers."""
        append_jsonl(self.metrics_file, record)
        self.tracking.log(record)

    def truncate_metrics_after(self, rnd: int) -> None:
        """Drop records of rounds after ``rnd`` (left by a run that died before checkpointing)."""
        if not self.metrics_file.is_file():
            return
        text = self.metrics_file.read_text(encoding="utf-8")
        lines = text.splitlines()
        if lines and not text.endswith("\n"):  # a kill while appending: the last record is cut
            log.warning("%s: dropped its last line, cut by an interrupted write (%d characters)",
                        self.metrics_file, len(lines[-1]))
            lines.pop()
        records = [json.loads(line) for line in lines if line.strip()]
        write_jsonl(self.metrics_file, [r for r in records if r.get(KEY_ROUND, 0) <= rnd])

    def write_predictions(self, rows: list[dict], name: str = PREDICTIONS_FILE) -> None:
        write_jsonl(self.path / name, rows)

    def write_item_scores(self, details: dict, zero_shot: bool = False) -> None:
        """``item_scores.json`` (``item_scores_zero_shot.json``): per-question held-out loss and
        multiple-choice choices of the last evaluation, for paired confidence intervals."""
        if details:
            write_json(self.path / (ITEM_SCORES_ZERO_SHOT_FILE if zero_shot else ITEM_SCORES_FILE), details)

    def write_partitions(self, summary: list[dict]) -> None:
        write_json(self.path / PARTITIONS_FILE, summary)

    def write_summary(self, summary: dict) -> None:
        """Write ``summary.json``: the run is complete, so its trackers close (MLflow: FINISHED)."""
        write_json(self.path / SUMMARY_FILE, summary)
        if self._tracking is not None:
            self._tracking.close(finished=True)

    def read_summary(self) -> dict:
        return json.loads((self.path / SUMMARY_FILE).read_text())
