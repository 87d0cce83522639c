"""The run directory ``workspace/<job>/<run-id>/`` and everything written into it (atomically)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from fedpeft.config import JobConfig, dump_config
from fedpeft.constants import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    FINAL_ADAPTER_DIR,
    KEY_ROUND,
    METRICS_FILE,
    PARTITIONS_FILE,
    PREDICTIONS_FILE,
    SUMMARY_FILE,
)
from fedpeft.errors import ConfigError
from fedpeft.io_utils import append_jsonl, read_jsonl, write_json, write_jsonl, write_text


class RunDir:
    """Paths and writers of one run's outputs."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, cfg: JobConfig) -> "RunDir":
        """A new run folder for ``cfg`` (run id: ``cfg.run_id`` or a timestamp)."""
        run_id = cfg.run_id or dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        path = Path(cfg.workspace) / cfg.job / run_id
        if (path / CHECKPOINT_DIR).exists():
            raise ConfigError(f"{path} already holds a run; resume it with --resume {path}, or pick another run_id")
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        write_text(run.config_file, dump_config(cfg))
        return run

    config_file = property(lambda self: self.path / CONFIG_FILE)
    metrics_file = property(lambda self: self.path / METRICS_FILE)
    predictions_file = property(lambda self: self.path / PREDICTIONS_FILE)
    adapter_dir = property(lambda self: self.path / FINAL_ADAPTER_DIR)

    def log_metrics(self, record: dict) -> None:
        """Append one record to ``metrics.jsonl``."""
        append_jsonl(self.metrics_file, record)

    def truncate_metrics_after(self, rnd: int) -> None:
        """Drop records of rounds after ``rnd`` (left by a run that died before checkpointing)."""
        if self.metrics_file.is_file():
            keep = [r for r in read_jsonl(self.metrics_file) if r.get(KEY_ROUND, 0) <= rnd]
            write_jsonl(self.metrics_file, keep)

    def write_predictions(self, rows: list[dict], name: str = PREDICTIONS_FILE) -> None:
        write_jsonl(self.path / name, rows)

    def write_partitions(self, summary: list[dict]) -> None:
        write_json(self.path / PARTITIONS_FILE, summary)

    def write_summary(self, summary: dict) -> None:
        write_json(self.path / SUMMARY_FILE, summary)

    def read_summary(self) -> dict:
        return json.loads((self.path / SUMMARY_FILE).read_text())
