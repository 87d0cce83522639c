"""``fedpeft run JOB --baseline NAME``: one baseline arm of a job alone, in ordinary run folders.

The arm is the one ``fedpeft benchmark`` runs beside the job (:func:`fedpeft.benchmark.baselines.arm_runs`):
the job's data, test questions and step budget. Each run is a normal run folder under the job's
workspace, ``<workspace>/<job>/<run id>``, whose run id names the baseline: ``centralized-<time>``,
or ``<run_id>-centralized`` when the job sets ``run_id``; ``local_only`` writes one run per client
(``local_only-<time>-client-0``, ...).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedpeft.benchmark.baselines import arm_runs, check_baseline
from fedpeft.benchmark.constants import ASCENDING_COLUMNS
from fedpeft.config import JobConfig
from fedpeft.constants import SUMMARY_FILE
from fedpeft.data.federated import prepare_data
from fedpeft.results import print_results
from fedpeft.run_dir import RunDir

log = logging.getLogger(__name__)


def baseline_run_id(cfg: JobConfig, name: str) -> str:
    """The run id of baseline ``name`` of the job ``cfg`` (before any ``-<client>``)."""
    return f"{cfg.run_id}-{name}" if cfg.run_id else f"{name}-{dt.datetime.now():%Y%m%d-%H%M%S-%f}"


def run_baseline(cfg: JobConfig, name: str) -> list[tuple[str | None, RunDir]]:
    """Run baseline ``name`` of the federated job ``cfg``; each run writes its own run folder.

    Args:
        cfg: The federated job (its data, rounds, training and evaluation settings).
        name: ``zero_shot``, ``local_only`` or ``centralized``.

    Returns:
        ``(client, run folder)`` per run: the client for ``local_only``, else None.

    Raises:
        ConfigError: for an unknown ``name``, or a run folder that exists already.
    """
    run_id = baseline_run_id(cfg, check_baseline(name))
    arm = arm_runs(name, cfg, lambda: prepare_data(cfg))
    done: list[tuple[str | None, RunDir]] = []
    for i, one in enumerate(arm, 1):
        folder = f"{run_id}-{one.client}" if one.client else run_id
        log.info("[baseline %s %d/%d] %s", name, i, len(arm), Path(cfg.workspace) / cfg.job / folder)
        run = one.run(one.cfg.model_copy(update={"run_id": folder}))
        run.release()  # the zero-shot run leaves its folder locked to the caller
        done.append((one.client, run))
    return done


def print_baseline(runs: list[tuple[str | None, RunDir]], name: str, console: Console | None = None) -> None:
    """Each run's results as ``fedpeft run`` prints them; for several clients, their final scores
    with the mean and the worst client (per metric: the highest loss, the lowest score)."""
    console = console or Console()
    for _, run in runs:
        print_results(run.path, console)
    if len(runs) < 2:
        return
    finals = {client: json.loads((run.path / SUMMARY_FILE).read_text()).get("final") or {} for client, run in runs}
    names = list(dict.fromkeys(k for final in finals.values() for k in final))
    table = Table(title=f"{name}: final evaluation of each client's run, the mean and the worst client")
    table.add_column("client")
    for metric in names:
        table.add_column(metric, justify="right")
    rows = {**finals, "mean": {}, "worst": {}}
    for metric in names:
        values = [f[metric] for f in finals.values() if isinstance(f.get(metric), (int, float))]
        if values:
            rows["mean"][metric] = sum(values) / len(values)
            rows["worst"][metric] = (max if metric in ASCENDING_COLUMNS else min)(values)
    for client, final in rows.items():
        table.add_row(str(client), *(f"{final[m]:.4f}" if m in final else "" for m in names))
    console.print(table)
