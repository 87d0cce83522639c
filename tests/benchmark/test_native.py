"""The native benchmark format (one YAML: a job + grid + baselines + rank) -> test cases."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedpeft.benchmark.plan import load_plan
from fedpeft.errors import ConfigError


def _write(path: Path, tree: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def test_relative_data_paths_resolve_beside_the_benchmark_file(tmp_path, monkeypatch):
    for name in ("train.jsonl", "other.jsonl", "test.jsonl"):
        (tmp_path / "bench" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "bench" / name).write_text("{}\n")
    path = _write(tmp_path / "bench/b.yaml", {
        "job": "b", "model": {"name": "tiny-random-llama"}, "data": {"train": "train.jsonl"},
        "federation": {"num_clients": 2},
        "grid": {"data.test": ["test.jsonl"], "data.train": ["train.jsonl", "other.jsonl"]},
        "baselines": ["zero_shot"]})
    monkeypatch.chdir(tmp_path)
    plan = load_plan(path)
    assert [(c.cfg.data.train, c.cfg.data.test) for c in plan.cases] == [
        (str(tmp_path / "bench/train.jsonl"), str(tmp_path / "bench/test.jsonl")),
        (str(tmp_path / "bench/other.jsonl"), str(tmp_path / "bench/test.jsonl"))]


def test_a_broken_base_job_is_reported_once_not_per_test_case(tmp_path):
    path = _write(tmp_path / "b.yaml", {
        "job": "b", "model": {"name": "tiny-random-llama"}, "train": {"batch_size": 0},
        "grid": {"train.learning_rate": [1e-3, 1e-4, 1e-5]}, "baselines": ["zero_shot", "centralised"],
        "rank": {"sort_by": [{"rougeL": "descend", "bleu4": "descend"}]}})
    with pytest.raises(ConfigError) as err:
        load_plan(path)
    assert [p.key for p in err.value.problems] == ["train.batch_size", "baselines.1", "rank.sort_by"]
    assert [p.line for p in err.value.problems] == [5, 13, 15]
    assert "each entry is one {metric: ascend|descend}, got ['rougeL', 'bleu4']" in str(err.value)
