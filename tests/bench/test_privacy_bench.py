"""``bench/privacy.py`` at smoke size on the tiny model: the r search, honest epsilons, no secrets in the results.

Needs MedQuAD beside the repo (skipped otherwise); about 30 s.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import privacy  # noqa: E402



@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    if not (privacy.MEDQUAD_DIR / "train.jsonl").is_file():
        pytest.skip(f"MedQuAD not found at {privacy.MEDQUAD_DIR}")
    out = tmp_path_factory.mktemp("results")
    # memorised at 0 bits: the search must stop at the first r and run DP at that r
    privacy.main(["--quick", "--memorised-bits", "0", "--results-dir", str(out)])
    return json.loads((out / "privacy.json").read_text())


def test_the_search_stops_at_the_first_memorised_r_and_dp_runs_at_it(result):
    rows = result["rows"]
    assert [(r["level"], r["target_epsilon"], r["repetitions"]) for r in rows] == [
        ("none", None, 2), ("example", 8.0, 2), ("client", 8.0, 2)]
    assert result["repetitions_found"] == 2 and result["memorised"]
    assert [("planted_exposure" in r) for r in rows] == [True, True, False]  # client level: not audited by default


def test_epsilon_is_what_the_run_spent_within_its_target(result):
    for row in result["rows"][1:]:
        assert 0.9 * row["target_epsilon"] < row["epsilon"] <= row["target_epsilon"] * (1 + 1e-9)
        assert row["delta"] == 1e-5 and row["noise"][0] > 0
    assert result["rows"][0]["epsilon"] is None
    md = result["markdown"]
    assert "∞ (no DP)" in md and "(δ = 1e-05)" in md and "base model, zero-shot" in md


def test_no_canary_name_or_secret_leaves_the_run_folder(result):
    from fedpeft.audit.canary import make_canaries
    from fedpeft.config import AuditConfig

    text = json.dumps(result)
    planted, unseen = make_canaries(AuditConfig(canaries=2, repetitions=2), 0)
    assert not any(c.secret in text or c.name in text for c in planted + unseen)
