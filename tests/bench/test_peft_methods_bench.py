"""``bench/peft_methods.py`` at smoke size on the tiny model: every registered PEFT method gets a row
with exact fp32 bytes, a failing method is reported, not lost, and the summary headline renders.

Uses MedQuAD when it is beside the repo, the shipped sample otherwise; about 25 s.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import peft_methods, run_all  # noqa: E402
from bench.common import RESULTS_DIR  # noqa: E402



@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("results")
    peft_methods.main(["--smoke", "--results-dir", str(out)])
    return json.loads((out / "peft_methods.json").read_text())


def test_every_registered_method_has_a_measured_row(result):
    from fedpeft.peft_methods import PEFT_METHODS

    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["zero-shot", *peft_methods.METHODS]
    assert set(PEFT_METHODS.names()) <= {m["method"] for m in peft_methods.METHODS.values()}
    assert rows["zero-shot"]["heldout_loss"] > 0 and rows["zero-shot"]["cpu_seconds"] > 0
    for name in peft_methods.METHODS:
        r = rows[name]
        assert "error" not in r, (name, r.get("error"))
        assert r["trainable"] > 0 and r["bytes_per_update"] == 4 * r["trainable"], name  # fp32 on the wire
        assert r["bytes_per_round"] == 2 * 2 * r["bytes_per_update"], name  # 2 clients, down and up
        assert len(r["train_losses"]) == 2 and math.isfinite(r["train_loss"]), name
        assert r["vs_zero_shot"] == pytest.approx(r["heldout_loss"] - rows["zero-shot"]["heldout_loss"])
        assert r["wall_seconds"] > 0 and r["cpu_seconds"] > 0, name


def test_sizes_order_as_the_methods_promise(result):
    rows = {r["method"]: r for r in result["rows"]}
    size = {name: rows[name]["trainable"] for name in peft_methods.METHODS}
    assert size["lora+rslora"] == size["lora"] < size["lora+dora"]  # rsLoRA only rescales; DoRA adds magnitudes
    assert size["ffa_lora"] < size["lora"]  # A stays frozen and home
    assert min(size, key=size.get) == "ia3"


def test_tables_show_parameters_and_bytes_and_go_to_the_given_folder(result):
    assert "trainable parameters" in result["markdown"] and "bytes per update" in result["markdown"]
    assert "error" not in result["markdown"].splitlines()[0]  # the header: no method failed
    assert "trainable_parameters" in result["leaderboard"] and "bytes_per_round" in result["leaderboard"]
    assert result["params"]["results_dir"] != str(RESULTS_DIR)  # never the committed results
    assert "held-out loss vs zero-shot: lora " in run_all.HEADLINES["peft_methods"](result)
    assert run_all.SECTIONS["peft_methods"] and "peft_methods" in run_all.LONG


def test_a_failing_method_is_reported_and_the_others_measured(tmp_path, monkeypatch):
    from fedpeft.peft_methods import ia3

    def broken(self, model):
        raise RuntimeError("ia3 is broken today")

    monkeypatch.setattr(ia3.IA3, "peft_config", broken)
    res = peft_methods.main(["--smoke", "--only", "lora", "ia3", "--results-dir", str(tmp_path)])
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["zero-shot", "lora", "ia3"]
    assert "ia3 is broken today" in rows["ia3"]["error"] and "heldout_loss" not in rows["ia3"]
    assert rows["lora"]["bytes_per_update"] == 4 * rows["lora"]["trainable"]
    header, *_ = res["markdown"].splitlines()
    assert "error" in header and "RuntimeError: ia3 is broken today" in res["markdown"]
    assert "ia3 failed" in run_all.HEADLINES["peft_methods"](res)
