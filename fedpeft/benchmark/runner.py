"""Run a :class:`~fedpeft.benchmark.plan.BenchmarkPlan`: every test case and baseline in its own
folder ``<workspace>/<job>/<algorithm>/<uuid>``, then the leaderboard and the report.

Each run is an ordinary fedpeft run directory (``run_job``) plus ``testcase.json``: the
leaderboard row (metrics, modules, hyperparameters, cost). Wall seconds cover the whole run
(model load, training, evaluation). Peak memory is the resident set of this process during the
run: exact when the run raised the process's high-water mark (``ru_maxrss``), otherwise the
maximum of samples taken every 50 ms; on CUDA the peak allocated GPU memory is added.

A run that fails is logged with its traceback and the others go on; the leaderboard and report
are still written, then :class:`~fedpeft.errors.FedPeftError` lists the failures.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import resource
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fedpeft.benchmark import baselines as bl
from fedpeft.benchmark.constants import (
    CENTRALIZED, COL_BYTES_PER_ROUND, COL_BYTES_PER_UPDATE, COL_CLIENTS, COL_HELDOUT_LOSS, COL_PEAK_GPU_MEMORY, COL_PEAK_MEMORY,
    COL_ROUNDS, COL_TRAINABLE, COL_WALL_SECONDS, KIND_FEDERATED, LOCAL_ONLY, PARADIGM_BASELINE, TESTCASE_FILE,
    SITE_COLUMNS, ZERO_SHOT,
)
from fedpeft.benchmark.leaderboard import print_board, write_board, write_plan_file
from fedpeft.benchmark.plan import BenchmarkPlan, Setting, TestCase
from fedpeft.config import JobConfig
from fedpeft.constants import EVENT_ROUND, KEY_BYTES_DOWN, KEY_BYTES_UP, KEY_EVENT, KEY_HELDOUT_LOSS
from fedpeft.data.federated import FederatedData, prepare_data
from fedpeft.errors import FedPeftError
from fedpeft.io_utils import read_jsonl, write_json
from fedpeft.run_dir import RunDir

log = logging.getLogger(__name__)


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def _maxrss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Peak resident memory (MB) of this process inside a ``with`` block, and peak CUDA memory."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_mb = 0.0
        self.gpu_peak_mb: float | None = None

    def __enter__(self) -> "PeakMemory":
        self._before = _maxrss_mb()
        self._sampled = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        if torch.cuda.is_available():
            for d in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(d)
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._sampled = max(self._sampled, _rss_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        after = _maxrss_mb()
        self.peak_mb = after if after > self._before else max(self._sampled, _rss_mb())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            total = sum(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count()))
            self.gpu_peak_mb = total / 2**20 if total else None


@dataclass
class Job:
    """One run of the benchmark: a test case or a baseline run, and its leaderboard identity."""

    kind: str  # federated | zero_shot | local_only | centralized
    folder: str  # <algorithm> folder under the job folder
    algorithm: str  # the algorithm column
    cfg: JobConfig
    meta: dict[str, Any]  # paradigm, modules, hyperparameters, group, client
    run: Callable[[JobConfig], RunDir]


@dataclass
class BenchmarkResult:
    """Where a benchmark wrote its outputs, and how many runs it made."""

    job_dir: Path
    runs: int


def _hyperparameters(case: TestCase, keep: Callable[[Setting], bool]) -> dict[str, Any]:
    return TestCase(case.algorithm, case.cfg, [s for s in case.settings if keep(s)], case.modules).hyperparameters


def _not_aggregation(s: Setting) -> bool:
    return not (s.target or "").startswith("federation.aggregation") and not s.column.startswith("aggregation-")


def _no_training(s: Setting) -> bool:
    return (s.target or "").split(".")[0] in ("model", "data", "eval")


def _baseline_meta(case: TestCase, keep: Callable[[Setting], bool], group: str, client: str | None = None) -> dict:
    return {"paradigm": PARADIGM_BASELINE, "modules": {"basemodel": case.modules.get("basemodel", ""), "aggregation": ""},
            "hyperparameters": _hyperparameters(case, keep), "group": group, "client": client,
            "zero_shot_group": bl.zero_shot_signature(case.cfg)}


def plan_jobs(plan: BenchmarkPlan) -> list[Job]:
    """Every run of the plan in order: zero-shot, the test cases, local-only, centralised."""
    from fedpeft.simulation import run_job

    cases = plan.cases
    if ZERO_SHOT in plan.baselines:  # computed once by the baseline instead of in every case
        cases = [TestCase(c.algorithm, c.cfg.model_copy(update={"eval": c.cfg.eval.model_copy(
            update={"zero_shot": False})}), c.settings, c.modules, c.paradigm) for c in cases]
    data_cache: dict[str, FederatedData] = {}

    def data_of(case: TestCase) -> FederatedData:
        key = bl.training_signature(case.cfg)
        if key not in data_cache:
            data_cache[key] = prepare_data(case.cfg)
        return data_cache[key]

    def arm(name: str, case: TestCase, sig: str, keep: Callable[[Setting], bool]) -> list[Job]:
        return [Job(name, name, f"{name} {r.client}" if r.client else name, r.cfg,
                    _baseline_meta(case, keep, sig, r.client), r.run)
                for r in bl.arm_runs(name, case.cfg, lambda: data_of(case))]

    jobs: list[Job] = []
    if ZERO_SHOT in plan.baselines:
        for sig, case in _distinct(cases, bl.zero_shot_signature).items():
            jobs += arm(ZERO_SHOT, case, sig, _no_training)
    for case in cases:
        meta = {"paradigm": case.paradigm, "modules": case.modules, "hyperparameters": case.hyperparameters,
                "group": bl.training_signature(case.cfg), "client": None,
                "zero_shot_group": bl.zero_shot_signature(case.cfg)}  # its round 0 in the report
        jobs.append(Job(KIND_FEDERATED, case.algorithm, case.algorithm, case.cfg, meta, run_job))
    for sig, case in _distinct(cases, bl.training_signature).items():
        jobs += [job for name in (LOCAL_ONLY, CENTRALIZED) if name in plan.baselines
                 for job in arm(name, case, sig, _not_aggregation)]
    return jobs


def _distinct(cases: list[TestCase], signature: Callable[[JobConfig], str]) -> dict[str, TestCase]:
    out: dict[str, TestCase] = {}
    for case in cases:
        out.setdefault(signature(case.cfg), case)
    return out


def _record(job: Job, run: RunDir, plan: BenchmarkPlan, wall: float, mem: PeakMemory, session: str) -> dict:
    summary = run.read_summary()
    final = summary.get("final") or {}
    rounds = [r for r in read_jsonl(run.metrics_file) if r.get(KEY_EVENT) == EVENT_ROUND]
    sent = [r[KEY_BYTES_DOWN] + r[KEY_BYTES_UP] for r in rounds]
    extra = {
        COL_ROUNDS: summary.get("rounds"), COL_CLIENTS: summary.get("num_clients"),
        COL_TRAINABLE: summary.get("trainable_parameters"),
        COL_BYTES_PER_UPDATE: summary.get("update_bytes") or None,  # zero-shot trains nothing
        # baselines communicate nothing: a single client needs no server
        COL_BYTES_PER_ROUND: round(sum(sent) / len(sent)) if sent and job.kind == KIND_FEDERATED else 0,
        COL_WALL_SECONDS: round(wall, 1), COL_PEAK_MEMORY: round(mem.peak_mb, 1),
        COL_PEAK_GPU_MEMORY: None if mem.gpu_peak_mb is None else round(mem.gpu_peak_mb, 1),
        COL_HELDOUT_LOSS: final.get(KEY_HELDOUT_LOSS),
        **{col: final[key] for col, key in SITE_COLUMNS.items() if key in final},  # per-site scores
    }
    return {
        "kind": job.kind, "session": session, "algorithm": job.algorithm, **job.meta,
        "metrics": {m.column: final.get(m.key) for m in plan.metrics}, "extra": extra,
        "time": dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S"), "url": str(run.path),
    }


def _execute(job: Job, plan: BenchmarkPlan, session: str) -> dict:
    cfg = job.cfg.model_copy(update={"workspace": str(plan.job_dir), "job": job.folder, "run_id": str(uuid.uuid4())})
    with PeakMemory() as mem:
        start = time.perf_counter()
        run = job.run(cfg)
        wall = time.perf_counter() - start
    row = _record(job, run, plan, wall, mem, session)
    write_json(run.path / TESTCASE_FILE, row)
    return row


def run_benchmark(plan: BenchmarkPlan, console: Console | None = None, report: bool = True) -> BenchmarkResult:
    """Run every test case and baseline of ``plan``; write the leaderboard and the report.

    Args:
        plan: From :func:`fedpeft.benchmark.plan.load_plan`.
        console: Where ``print_table`` prints (default: stdout).
        report: Also write ``report.html``.

    Returns:
        The job folder and the number of runs made in this session.

    Raises:
        FedPeftError: after writing every output, if any run failed (each is listed).
    """
    plan.job_dir.mkdir(parents=True, exist_ok=True)
    write_plan_file(plan)
    session = dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    jobs = plan_jobs(plan)
    failures: list[str] = []
    for i, job in enumerate(jobs, 1):
        label = f"{job.algorithm} ({', '.join(f'{k}={v}' for k, v in job.meta['hyperparameters'].items())})"
        log.info("[test case %d/%d] %s", i, len(jobs), label)
        try:
            _execute(job, plan, session)
        except Exception as e:  # noqa: BLE001 - one failing run must not lose the others
            log.exception("[test case %d/%d] failed: %s", i, len(jobs), label)
            failures.append(f"{label}: {type(e).__name__}: {e}")
        write_board(plan.job_dir)  # partial results stay readable if the job is interrupted
    _, selected, _ = write_board(plan.job_dir)
    if plan.rank.visualization.mode != "off":
        print_board(selected, f"{plan.name}: leaderboard ({plan.job_dir})", console)
    if report:
        from fedpeft.benchmark.report import write_report

        write_report(plan.job_dir)
    if failures:
        raise FedPeftError(f"{len(failures)} of {len(jobs)} runs failed (the others are in the leaderboard):\n"
                           + "\n".join(f"  - {f}" for f in failures))
    return BenchmarkResult(plan.job_dir, len(jobs))
