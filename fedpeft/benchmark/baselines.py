"""Baselines run beside the federated test cases, on the same data and test questions.

* ``zero_shot``: the base model without any adapter, evaluated once per distinct
  (model, data, eval) setup. It is its own evaluation (no training run), so federated test cases
  skip their own round-0 evaluation when this baseline is asked for (``eval.zero_shot: false``).
* ``local_only``: each client trains alone on its own partition: one single-client run per
  client, with the same rounds, local epochs / ``max_steps`` and learning rate as the federated
  run, and no aggregation (each round starts from the client's own previous adapter). Rows per
  client, plus mean and worst client.
* ``centralized``: one client holding every partition's rows. It takes as many optimizer
  steps in total as the federated run took over all clients and rounds: ``rounds`` rounds of
  ``max_steps = ceil(total / rounds)`` steps, with enough local epochs to reach them. Same
  batch size, so it sees as many examples as the federated clients together.

Baselines are computed once per distinct training setup of the federated test cases, with the
aggregation left out (``signature``): a grid over ``peft_method`` gets one set per method, a
grid over aggregations shares one. :func:`arm_runs` is what both ``fedpeft benchmark`` and
``fedpeft run JOB --baseline NAME`` run for one job.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.benchmark.constants import BASELINES, CENTRALIZED, LOCAL_ONLY, ZERO_SHOT
from fedpeft.config import JobConfig, validate_tree
from fedpeft.constants import BASELINE_FILE, METRICS_FILE
from fedpeft.data.federated import FederatedData
from fedpeft.data.partitioners import partition_summary
from fedpeft.errors import ConfigError
from fedpeft.io_utils import write_json
from fedpeft.problems import did_you_mean
from fedpeft.run_dir import RunDir
from fedpeft.trainer import num_optimizer_steps

_RUN_KEYS = ("job", "workspace", "run_id")
CENTRAL_CLIENT = "central"


def _digest(tree: Any) -> str:
    return hashlib.sha1(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:12]


def training_signature(cfg: JobConfig) -> str:
    """Equal for test cases that differ only in aggregation (and run naming)."""
    tree = cfg.model_dump(mode="json")
    for key in _RUN_KEYS:
        tree.pop(key)
    tree["federation"]["aggregation"] = {"name": "fedavg"}
    tree["eval"].pop("zero_shot")
    return _digest(tree)


def zero_shot_signature(cfg: JobConfig) -> str:
    """Equal for test cases whose base model, data and evaluation agree."""
    tree = cfg.model_dump(mode="json")
    eval_tree = {k: v for k, v in tree["eval"].items() if k not in ("zero_shot", "every")}
    return _digest({"seed": cfg.seed, "model": tree["model"], "data": tree["data"], "eval": eval_tree})


def single_client_config(cfg: JobConfig, train: dict[str, Any] | None = None) -> JobConfig:
    """``cfg`` for a one-client run on data given to ``run_job`` directly (no aggregation)."""
    tree = cfg.model_dump(mode="json")
    tree["federation"].update({"num_clients": 1, "clients_per_round": None, "min_clients": 1,
                               "aggregation": {"name": "fedavg"}})
    tree["data"]["client_files"] = None
    tree["eval"]["zero_shot"] = False  # the zero_shot baseline evaluates the base model once
    tree["train"].update(train or {})
    return validate_tree(tree, source="baseline config")


def _one_client(client_id: str, rows: list[dict], test: list[dict], field: str | None,
                slices: list[list[dict]] | None = None, site_ids: list[str] | None = None) -> FederatedData:
    """One client's data; ``slices``: the sites' own test slices it is scored on (per-site scores)."""
    return FederatedData([client_id], [rows], test, partition_summary([rows], field), slices or [], site_ids or [])


def local_only(cfg: JobConfig, data: FederatedData) -> list[tuple[str, JobConfig, FederatedData]]:
    """One ``(client id, config, data)`` per client: that client's partition alone."""
    field = cfg.federation.partition.params.get("field")
    one = single_client_config(cfg)
    slices = data.client_test_rows or [[] for _ in data.client_ids]  # each client scored on its own slice
    return [(cid, one, _one_client(cid, rows, data.test_rows, field, [held] if held else None))
            for cid, rows, held in zip(data.client_ids, data.client_rows, slices)]


def federated_steps(cfg: JobConfig, data: FederatedData) -> int:
    """Optimizer steps the federated run takes over every sampled client and round."""
    from fedpeft.rounds import sample_clients

    sizes = dict(zip(data.client_ids, map(len, data.client_rows)))
    return sum(num_optimizer_steps(sizes[c], cfg.train)
               for rnd in range(1, cfg.federation.rounds + 1)
               for c in sample_clients(cfg, rnd, data.client_ids))


def centralized(cfg: JobConfig, data: FederatedData) -> tuple[JobConfig, FederatedData, int]:
    """The centralised run: every partition's rows as one client, with matched optimizer steps.

    Returns:
        ``(config, data, steps per round)``.
    """
    rows = [r for part in data.client_rows for r in part]
    rounds = cfg.federation.rounds
    per_round = math.ceil(federated_steps(cfg, data) / rounds)
    micro_per_epoch = math.ceil(len(rows) / cfg.train.batch_size)
    epochs = max(1, math.ceil(per_round * cfg.train.grad_accum / micro_per_epoch))
    one = single_client_config(cfg, {"max_steps": per_round, "local_epochs": epochs})
    assert num_optimizer_steps(len(rows), one.train) == per_round
    field = cfg.federation.partition.params.get("field")
    # scored on every site's own slice, under the sites' names (per-site scores)
    return one, _one_client(CENTRAL_CLIENT, rows, data.test_rows, field, data.client_test_rows, data.client_ids), per_round


def run_zero_shot(cfg: JobConfig, data: FederatedData) -> RunDir:
    """Evaluate the base model alone on the test rows; write a run folder like a 0-round run.

    The folder holds ``config.yaml``, ``metrics.jsonl`` (one round-0 evaluation record),
    ``predictions_zero_shot.jsonl`` and ``summary.json`` (0 rounds, 0 trainable parameters).
    """
    from fedpeft.models import resolve_devices
    from fedpeft.rounds import write_summary, zero_shot
    from fedpeft.worker import LocalHost, build_worker

    run = RunDir.create(cfg)
    host = LocalHost(build_worker(cfg, resolve_devices(cfg.model.devices)[0]))
    metrics = zero_shot(cfg, run, host, data.test_rows)
    write_summary(cfg, run, None, copy.deepcopy(metrics), rounds=0, num_clients=0, peft=None, aggregation=None)
    return run


def check_baseline(name: str) -> str:
    """``name`` if it names a baseline.

    Raises:
        ConfigError: naming the closest baseline and listing them all.
    """
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}{did_you_mean(name, BASELINES)}; "
                          f"baselines: {', '.join(BASELINES)}")
    return name


@dataclass(frozen=True)
class ArmRun:
    """One run of a baseline arm. ``run(cfg)`` makes its run folder, where ``cfg`` is :attr:`cfg`
    with the workspace, job and run id to write under."""

    client: str | None  # local_only: the client that trains alone; None otherwise
    cfg: JobConfig
    run: Callable[[JobConfig], RunDir]
    data: FederatedData | None = None  # what it trains on (None: zero_shot, which trains nothing)


def _marked(name: str, client: str | None, job: JobConfig, run: Callable[[JobConfig], RunDir]):
    """``run``, after writing ``baseline.json`` into the run folder: the arm and the federated job it
    comes from, which ``--resume`` needs to rebuild the arm's data (:func:`resume_baseline`)."""
    def go(cfg: JobConfig) -> RunDir:
        if cfg.run_id is None:
            cfg = cfg.model_copy(update={"run_id": dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")})
        folder = Path(cfg.workspace) / cfg.job / cfg.run_id
        if not (folder / METRICS_FILE).exists():  # RunDir.create refuses a folder holding a run
            write_json(folder / BASELINE_FILE, {"baseline": name, "client": client, "job": job.model_dump(mode="json")})
        return run(cfg)
    return go


def arm_runs(name: str, cfg: JobConfig, data: Callable[[], FederatedData]) -> list[ArmRun]:
    """The runs of baseline ``name`` for the federated job ``cfg``, in order.

    Args:
        name: ``zero_shot``, ``local_only`` or ``centralized``.
        cfg: The federated job.
        data: Returns the job's data (``prepare_data``); called here, or for ``zero_shot`` only
            when its run starts.

    Returns:
        One run for ``zero_shot`` and ``centralized``, one per client for ``local_only``.

    Raises:
        ConfigError: for an unknown ``name``.
    """
    from fedpeft.simulation import run_job

    if check_baseline(name) == ZERO_SHOT:
        return [ArmRun(None, cfg, _marked(name, None, cfg, lambda c: run_zero_shot(c, data())))]
    if name == LOCAL_ONLY:
        return [ArmRun(cid, one, _marked(name, cid, cfg, lambda c, d=d: run_job(c, data=d)), d)
                for cid, one, d in local_only(cfg, data())]
    assert name == CENTRALIZED
    one, central, _ = centralized(cfg, data())
    return [ArmRun(None, one, _marked(name, None, cfg, lambda c: run_job(c, data=central)), central)]


def resume_baseline(path: Path, allow_config_change: tuple[str, ...] = ()) -> RunDir | None:
    """Continue the baseline run in ``path`` from its latest checkpoint, on the data of its arm
    (rebuilt from the job in its ``baseline.json``); None if ``path`` is no baseline's run folder.

    Raises:
        ConfigError: for a zero_shot run (nothing to resume) or an unreadable ``baseline.json``.
        CheckpointError: as :func:`fedpeft.simulation.run_job` on resume (the data changed, ...).
    """
    from fedpeft.data.federated import prepare_data
    from fedpeft.simulation import run_job

    marker = Path(path) / BASELINE_FILE
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
        name, client, job = info["baseline"], info["client"], validate_tree(info["job"], source=str(marker))
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{marker}: unreadable ({e}); start the baseline again: fedpeft run JOB.yaml --baseline "
                          "NAME") from None
    if name == ZERO_SHOT:
        raise ConfigError(f"{path} is a zero_shot baseline: it trains nothing, so there is nothing to resume; run it "
                          "again with fedpeft run JOB.yaml --baseline zero_shot")
    arm = next(a for a in arm_runs(name, job, lambda: prepare_data(job)) if a.client == client)
    return run_job(None, resume=path, data=arm.data, allow_config_change=allow_config_change)
