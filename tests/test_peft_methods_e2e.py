"""Every PEFT method by name: a 2-round federated job on the tiny model, and its saved adapter
loads back and answers as the run did."""

from __future__ import annotations

import json

import pytest

from fedpeft.adapters import load_adapter
from fedpeft.config import validate_tree
from fedpeft.generation import generate_answers
from fedpeft.io_utils import read_jsonl
from fedpeft.simulation import run_job
from tiny_jobs import tiny_job

METHODS = {
    "lora (DoRA, rsLoRA)": {"method": "lora", "r": 2, "use_dora": True, "use_rslora": True},
    "ffa_lora": {"method": "ffa_lora", "r": 2},
    "ia3": {"method": "ia3"},
    "prompt_tuning": {"method": "prompt_tuning", "num_virtual_tokens": 3},
    "prefix": {"method": "prefix", "num_virtual_tokens": 3, "encoder_hidden_size": 8},
}


@pytest.mark.parametrize("name", list(METHODS))
def test_a_method_trains_two_rounds_and_its_adapter_answers_alike(tmp_path, name):
    eval_cfg = {"every": 0, "zero_shot": False, "max_new_tokens": 3, "metrics": ["rougeL"], "heldout_loss": True}
    job = {**tiny_job("m", test_rows=3, eval=eval_cfg), "peft": METHODS[name], "workspace": str(tmp_path)}
    run = run_job(validate_tree(job))
    summary = json.loads((run.path / "summary.json").read_text())
    rounds = [r for r in read_jsonl(run.metrics_file) if r["event"] == "round"]
    assert len(rounds) == 2 and summary["trainable_parameters"] > 0
    assert rounds[0]["bytes_up"] == 2 * 4 * summary["trainable_parameters"]  # 2 clients, fp32
    assert summary["final"]["heldout_loss"] > 0
    preds = read_jsonl(run.path / "predictions.jsonl")
    model, tok = load_adapter(run.adapter_dir)
    cfg = validate_tree(job).eval  # the run's generation settings (its repetition penalty too)
    again = generate_answers(model, tok, [p["question"] for p in preds], max_new_tokens=cfg.max_new_tokens,
                             repetition_penalty=cfg.repetition_penalty, progress=False)
    assert again == [p["prediction"] for p in preds]
