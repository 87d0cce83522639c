"""``fedpeft audit RUN_DIR``: score a trained run's canaries and write ``RUN_DIR/audit/report.json``.

The run folder gives everything: ``config.yaml`` (the job, with its ``audit`` and ``privacy``
sections), ``checkpoints/`` (the newest verified global adapter; after the last round it is the
adapter in ``adapter/``) and, once finished, ``summary.json`` (with ``epsilon`` when the run
was private). The canaries are regenerated from ``(seed, audit)``; the report, which holds
their secrets, is written only inside the run folder.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import torch

from fedpeft.adapters import set_trainable_state
from fedpeft.audit.canary import make_canaries
from fedpeft.audit.exposure import CanaryScore, audit_canaries
from fedpeft.checkpoint import Checkpoint, load_latest_checkpoint
from fedpeft.config import JobConfig, load_config
from fedpeft.constants import SUMMARY_FILE
from fedpeft.errors import ConfigError
from fedpeft.io_utils import write_json
from fedpeft.models import resolve_devices
from fedpeft.run_dir import RunDir
from fedpeft.tables import markdown_table
from fedpeft.worker import build_worker

log = logging.getLogger(__name__)

AUDIT_DIR = "audit"
REPORT_FILE = "report.json"
MIN_CANDIDATES = 10


def report_path(run_dir: str | Path) -> Path:
    """Where :func:`audit_run` writes the report of ``run_dir``."""
    return Path(run_dir) / AUDIT_DIR / REPORT_FILE


def _load(run: RunDir) -> tuple[JobConfig, Checkpoint]:
    """The run's config and newest verified checkpoint, without disturbing this process's RNGs.

    Raises:
        ConfigError: if the run planted no canaries or has no checkpoint yet.
    """
    cfg = load_config(run.config_file)
    if not cfg.audit.canaries:
        raise ConfigError(f"{run.path} was trained without canaries (audit.canaries: 0), so there is nothing to audit; "
                          "add `audit: {canaries: 4}` to the job and run it again")
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):  # loading a checkpoint restores the run's RNG states
        ckpt = load_latest_checkpoint(run.path)
    random.setstate(py_state)
    if ckpt is None:
        raise ConfigError(f"{run.path} has no checkpoint yet (no round finished); audit it after its first round")
    return cfg, ckpt


def audit_run(run_dir: str | Path, *, candidates: int | None = None, device: str | None = None,
              progress: bool = True) -> dict:
    """Score the planted and unseen canaries of a run on its global adapter; write and return the report.

    Args:
        run_dir: A run folder (``workspace/<job>/<run-id>``) of a job with ``audit.canaries > 0``.
        candidates: Random secrets per canary; ``None``: the job's ``audit.candidates``.
        device: Where the model runs; ``None``: the first of the job's ``model.devices``.
        progress: Show a progress bar over canaries.

    Returns:
        The report (also written to ``RUN_DIR/audit/report.json``): ``canaries`` (one
        :class:`~fedpeft.audit.exposure.CanaryScore` dict each), ``summary`` (planted vs unseen),
        the run's ``privacy`` section and ``epsilon`` (None if ``summary.json`` has none).

    Raises:
        ConfigError: if ``run_dir`` is not a run folder, is in use by a running job, planted no
            canaries, has no checkpoint, or ``candidates`` is below 10.
    """
    if candidates is not None and candidates < MIN_CANDIDATES:
        raise ConfigError(f"--candidates must be at least {MIN_CANDIDATES}, got {candidates}")
    run = RunDir.open(Path(run_dir))  # the one writer of the folder while auditing
    try:
        cfg, ckpt = _load(run)
        n = candidates or cfg.audit.candidates
        worker = build_worker(cfg, device or resolve_devices(cfg.model.devices)[0])
        set_trainable_state(worker.model, ckpt.global_state)
        planted, unseen = make_canaries(cfg.audit, cfg.seed)
        log.info("auditing %s after round %d: %d planted and %d unseen canaries, %d candidates each",
                 run.path, ckpt.round, len(planted), len(unseen), n)
        scores = audit_canaries(worker.model, worker.tokenizer, planted, unseen, candidates=n, seed=cfg.seed,
                                system_prompt=cfg.data.system_prompt, max_seq_len=cfg.data.max_seq_len,
                                progress=progress)
        report = build_report(run, cfg, ckpt.round, n, scores)
        write_json(report_path(run.path), report)
    finally:
        run.release()
    return report


def build_report(run: RunDir, cfg: JobConfig, rnd: int, candidates: int, scores: list[CanaryScore]) -> dict:
    """The ``report.json`` of a run: per-canary scores, planted-vs-unseen summary, privacy settings."""
    summary = run.read_summary() if (run.path / SUMMARY_FILE).is_file() else {}
    return {
        "run_dir": str(run.path), "job": cfg.job, "round": rnd, "rounds": cfg.federation.rounds,
        "audit": {**cfg.audit.model_dump(mode="json"), "candidates": candidates},
        "privacy": cfg.privacy.model_dump(mode="json"), "epsilon": summary.get("epsilon"),
        "max_exposure": {"empirical": math.log2(1 + candidates), "extrapolated": cfg.audit.secret_digits * math.log2(10)},
        "summary": {"planted": summarise([s for s in scores if s.planted]),
                    "unseen": summarise([s for s in scores if not s.planted])},
        "canaries": [s.to_dict() for s in scores],
    }


def summarise(scores: list[CanaryScore]) -> dict:
    """Mean and max exposure (empirical and extrapolated) of ``scores``, and how many were extracted."""
    emp = [s.exposure for s in scores]
    ext = [s.exposure_extrapolated for s in scores if s.exposure_extrapolated is not None]
    return {
        "count": len(scores), "extracted": sum(s.extracted for s in scores),
        "mean_exposure": sum(emp) / len(emp), "max_exposure": max(emp),
        "mean_exposure_extrapolated": sum(ext) / len(ext) if ext else None,
        "max_exposure_extrapolated": max(ext) if ext else None,
    }


def audit_tables(reports: list[dict]) -> str:
    """What ``fedpeft audit`` prints: the first run's canaries, then one summary row per run."""
    return f"{canary_table(reports[0])}\n\n{comparison_table(reports)}"


def _bits(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def canary_table(report: dict) -> str:
    """Markdown table, one row per canary (no names or secrets: those stay in the run folder)."""
    rows, seen = [], {True: 0, False: 0}
    for c in report["canaries"]:
        seen[c["planted"]] += 1
        rows.append([f"{'planted' if c['planted'] else 'unseen'} {seen[c['planted']]}", _bits(c["exposure"]),
                     _bits(c["exposure_extrapolated"]), f"{c['rank']}/{c['candidates'] + 1}",
                     "yes" if c["extracted"] else "no"])
    return markdown_table(["canary", "exposure (bits)", "extrapolated (bits)", "rank", "extracted"], rows,
                          align=["left", "right", "right", "right", "left"])


def comparison_table(reports: list[dict]) -> str:
    """Markdown table, one row per run: epsilon, planted and unseen exposure, extractions."""
    rows = []
    for r in reports:
        p, u = r["summary"]["planted"], r["summary"]["unseen"]
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.3g}"
        rows.append([r["run_dir"], r["privacy"].get("level", "-"), eps, _bits(p["mean_exposure"]),
                     _bits(p["max_exposure"]), _bits(p["mean_exposure_extrapolated"]), _bits(u["mean_exposure"]),
                     f"{p['extracted']}/{p['count']}"])
    return markdown_table(["run", "privacy", "epsilon", "planted mean", "planted max", "planted extrap. mean",
                           "unseen mean", "extracted"], rows,
                          align=["left", "left", "right", "right", "right", "right", "right", "right"])
