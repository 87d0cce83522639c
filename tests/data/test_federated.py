"""prepare_data: one meaning of data.max_train_samples (total training rows over all clients)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpeft.config import validate_tree
from fedpeft.data.federated import prepare_data
from fedpeft.data.io import SAMPLE_PATH


@pytest.fixture
def client_files(tmp_path: Path) -> list[str]:
    """Three sites with 10, 14 and 12 disjoint rows of the shipped sample."""
    rows = SAMPLE_PATH.read_text(encoding="utf-8").splitlines()
    paths, start = [], 0
    for i, size in enumerate((10, 14, 12)):
        path = tmp_path / f"site-{i}.jsonl"
        path.write_text("\n".join(rows[start:start + size]) + "\n", encoding="utf-8")
        paths.append(str(path))
        start += size
    return paths


def _job(data: dict) -> dict:
    return {"seed": 1, "data": data, "federation": {"num_clients": 3}}


def _ids(rows: list[dict]) -> set[str]:
    return {r["id"] for r in rows}


def test_pooled_data_is_capped_in_total(tmp_path):
    data = prepare_data(validate_tree(_job({"train": "builtin:sample", "max_train_samples": 9})))
    assert sum(len(p) for p in data.client_rows) == 9
    assert len(data.test_rows) == 8  # the test rows are held out first (0.1 of 80), never capped


def test_client_files_are_capped_in_total_too(client_files):
    test = client_files[0]  # any file: only its rows are read as the test set
    data = prepare_data(validate_tree(_job({"client_files": client_files, "test": test, "max_train_samples": 9})))
    assert [len(p) for p in data.client_rows] == [3, 3, 3]  # 9 // 3 clients each
    uncapped = prepare_data(validate_tree(_job({"client_files": client_files, "test": test})))
    assert [len(p) for p in uncapped.client_rows] == [10, 14, 12]


def test_client_files_hold_out_test_rows_before_the_cap(client_files):
    job = _job({"client_files": client_files, "test_ratio": 0.2, "max_train_samples": 12})
    data = prepare_data(validate_tree(job))
    uncapped = prepare_data(validate_tree({**job, "data": {**job["data"], "max_train_samples": None}}))
    assert [len(p) for p in data.client_rows] == [4, 4, 4]
    assert data.test_rows == uncapped.test_rows and len(data.test_rows) == 2 + 3 + 2  # 0.2 of each whole file
    assert all(_ids(c) <= _ids(u) for c, u in zip(data.client_rows, uncapped.client_rows))
