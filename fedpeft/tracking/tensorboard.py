"""``tracking: [tensorboard]``: TensorBoard event files in ``RUN_DIR/tensorboard/``.

View with ``tensorboard --logdir RUN_DIR/tensorboard`` (or ``--logdir workspace/<job>`` to compare
runs). Written with ``torch.utils.tensorboard.SummaryWriter``; every number of a record is a
scalar at step = the record's round, and the resolved config is a text entry (``config``).

A resumed run opens its writer with ``purge_step`` = its first round: TensorBoard then hides
every event at that step or later written before (by the attempt that died before its
checkpoint), so each step shows the values of the run that went on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fedpeft.tracking import TENSORBOARD_DIR, TRACKERS, require, scalars, step_of

if TYPE_CHECKING:
    from fedpeft.tracking.settings import TrackingConfig

log = logging.getLogger(__name__)

CONFIG_TAG = "config"


@TRACKERS.register("tensorboard")
class TensorBoardTracker:
    """Scalars and the config into TensorBoard event files (see the module docstring)."""

    requires = (("tensorboard", "tensorboard"),)

    def __init__(self, settings: TrackingConfig) -> None:
        self._writer: Any = None

    def start(self, run_dir: Path, config: dict[str, Any], first_step: int) -> None:
        require("tensorboard", "tensorboard", "tensorboard")  # torch's writer needs it; say so first
        writer_cls = require("torch.utils.tensorboard", "tensorboard", "tensorboard").SummaryWriter
        folder = run_dir / TENSORBOARD_DIR
        self._writer = writer_cls(str(folder), purge_step=first_step)
        # Markdown: an indented block keeps the YAML as it is.
        text = "".join(f"    {line}\n" for line in yaml.safe_dump(config, sort_keys=False).splitlines())
        self._writer.add_text(CONFIG_TAG, text, global_step=first_step)
        log.info("tracking: TensorBoard events in %s (view: tensorboard --logdir %s)", folder, folder)

    def log(self, record: dict[str, Any]) -> None:
        step = step_of(record)
        for tag, value in scalars(record).items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()  # a killed run keeps every round it logged

    def close(self, finished: bool) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
