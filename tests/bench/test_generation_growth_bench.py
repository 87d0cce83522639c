"""bench/generation_growth.py at its tiniest: every arm runs, gives the same tokens, and is written down."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import generation_growth  # noqa: E402


def test_every_arm_gives_the_same_full_length_answers(tmp_path, monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    res = generation_growth.main(["--max-new-tokens", "3", "5", "--arms", "before", "cache", "after",
                                  "--results-dir", str(tmp_path)])
    rows = res["rows"]
    assert [(r["new_tokens"], r["batch_size"], r["arm"]) for r in rows] == [
        (n, b, arm) for n in (3, 5) for b in (1, 4) for arm in ("before", "cache", "after")]
    assert all(r["identical"] and r["tokens"] == 4 * r["new_tokens"] for r in rows)  # EOS masked: full length
    assert all(r["batch_gain"] == 1.0 for r in rows if r["batch_size"] == 1)
    assert set(res["goal"]["gains"]) == {"before", "cache", "after"}
    assert json.loads((tmp_path / "generation_growth.json").read_text())["markdown"] == res["markdown"]
