"""The one round loop (fedpeft.rounds): seeds per client, resume without duplicated records."""

from __future__ import annotations

import shutil

import numpy as np

from fedpeft.config import JobConfig, validate_tree
from fedpeft.io_utils import read_jsonl, write_jsonl
from fedpeft.rounds import client_seed
from fedpeft.simulation import run_job
from tiny_jobs import tiny_job

JOB = tiny_job("rounds", seed=5, test_rows=3,
               eval={"every": 1, "max_new_tokens": 4, "batch_size": 4, "metrics": ["rougeL"]})
_TIMING = ("seconds", "tokens_per_s", "gen_tokens_per_s", "wall_s",  # measurements, not results
           "memory_base_weights_bytes", "memory_adapter_optimizer_bytes", "memory_peak_activation_bytes",
           "eval_seconds", "peak_memory_bytes")


def test_client_seeds_are_distinct_for_thousands_of_clients():
    cfg = JobConfig.model_validate({"seed": 3})
    seeds = [client_seed(cfg, rnd, i) for rnd in range(1, 4) for i in range(2500)]
    assert len(set(seeds)) == len(seeds)  # the old seed*1000003 + rnd*1009 + i repeats at i = 1009
    assert client_seed(cfg, 1, 1009) != client_seed(cfg, 2, 0)
    assert all(0 <= s < 2**63 for s in seeds) and isinstance(seeds[0], int)
    assert client_seed(JobConfig.model_validate({"seed": 4}), 1, 0) != client_seed(cfg, 1, 0)
    assert np.random.default_rng(seeds[0]) is not None  # usable as a seed


def _untimed(record):
    if isinstance(record, dict):
        return {k: _untimed(v) for k, v in record.items() if k not in _TIMING}
    if isinstance(record, list):
        return [_untimed(v) for v in record]
    return record


def test_resume_after_a_kill_before_the_first_checkpoint_writes_each_record_once(tmp_path):
    full = run_job(validate_tree({**JOB, "workspace": str(tmp_path), "run_id": "full"}))
    # Killed after round 1's metrics line, before its checkpoint: no checkpoint at all yet.
    part = tmp_path / "rounds" / "part"
    shutil.copytree(full.path, part)
    for name in ("checkpoints", "adapter", "summary.json", "predictions.jsonl"):
        shutil.rmtree(part / name) if (part / name).is_dir() else (part / name).unlink()
    write_jsonl(part / "metrics.jsonl", read_jsonl(full.metrics_file)[:2])  # rounds 0 and 1
    run_job(None, resume=part)
    resumed, uninterrupted = read_jsonl(part / "metrics.jsonl"), read_jsonl(full.metrics_file)
    assert [r["round"] for r in resumed] == [0, 1, 2]
    assert _untimed(resumed) == _untimed(uninterrupted)  # line for line


def test_resume_after_a_kill_between_metrics_and_checkpoint_drops_the_orphan_record(tmp_path):
    job = {**JOB, "federation": {**JOB["federation"], "rounds": 3}, "workspace": str(tmp_path)}
    full = run_job(validate_tree({**job, "run_id": "full"}))
    part = tmp_path / "rounds" / "part"
    shutil.copytree(full.path, part)
    # Round 2's record was written, then the process died before its checkpoint.
    (part / "checkpoints" / "latest").write_text("round-0001\n")
    for r in (2, 3):
        shutil.rmtree(part / "checkpoints" / f"round-000{r}")
    write_jsonl(part / "metrics.jsonl", read_jsonl(full.metrics_file)[:3])  # rounds 0, 1, 2
    run_job(None, resume=part)
    resumed = read_jsonl(part / "metrics.jsonl")
    assert [r["round"] for r in resumed] == [0, 1, 2, 3]
    assert _untimed(resumed) == _untimed(read_jsonl(full.metrics_file))
