"""Fixtures of the benchmark tests: the files of a tiny Ianvs-format job."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmark_jobs import tiny_ianvs_files


@pytest.fixture
def ianvs_files(tmp_path: Path) -> dict[str, dict]:
    """``{relative path: YAML tree}`` of a two-value grid (lora, ptuning) with every baseline."""
    return tiny_ianvs_files(tmp_path)
