"""``fedpeft eval``: a run scored again on any test files gives the run's own numbers; beside the base
model it gets paired bootstrap intervals; bad input is a one-line error naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from tiny_jobs import tiny_job

from fedpeft.cli import main
from fedpeft.data.io import SAMPLE_PATH, load_examples
from fedpeft.io_utils import read_jsonl, write_jsonl

QUALITY = ("rougeL", "bleu4", "heldout_loss")  # deterministic; speed and memory are not


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory) -> Path:
    """A 1-round run that evaluated the base model (round 0) and its adapter on ``test_a.jsonl``;
    its adapter answers in words where the base model answers nothing."""
    root = tmp_path_factory.mktemp("scored")
    rows = [{"question": r["question"], "answer": r["answer"]} for r in load_examples(SAMPLE_PATH)]
    write_jsonl(root / "test_a.jsonl", rows[:3])
    write_jsonl(root / "test_b.jsonl", rows[3:7])
    job = {**tiny_job("scored"), "workspace": str(root / "ws"), "run_id": "r1"}
    job["data"] = {**job["data"], "test": str(root / "test_a.jsonl"), "max_test_samples": None}
    job["federation"] = {**job["federation"], "rounds": 1}
    job["train"] = {**job["train"], "learning_rate": 5e-2, "max_steps": 2}
    job["eval"] = {"every": 0, "zero_shot": True, "max_new_tokens": 8, "repetition_penalty": 1.3,
                   "metrics": ["rougeL", "bleu4"], "heldout_loss": True}
    (root / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["run", str(root / "job.yaml")]) == 0
    return root / "ws" / "scored" / "r1"


def _quality(metrics: dict) -> dict:
    return {k: metrics[k] for k in QUALITY}


def test_a_run_scored_on_two_test_files_gives_its_own_final_evaluation_on_its_test_set(scored_run, tmp_path):
    root = scored_run.parents[2]
    out = tmp_path / "out"
    assert main(["eval", str(scored_run), "--test", str(root / "test_a.jsonl"), "--test", str(root / "test_b.jsonl"),
                 "--out", str(out)]) == 0
    final = json.loads((scored_run / "summary.json").read_text())["final"]
    mine = json.loads((out / "r1" / "test_a" / "metrics.json").read_text())
    assert _quality(mine) == _quality(final)  # same adapter, questions and settings: the same numbers
    assert read_jsonl(out / "r1" / "test_a" / "predictions.jsonl") == read_jsonl(scored_run / "predictions.jsonl")
    other = read_jsonl(out / "r1" / "test_b" / "predictions.jsonl")
    assert [p["question"] for p in other] == [r["question"] for r in read_jsonl(root / "test_b.jsonl")]
    assert json.loads((out / "r1" / "test_b" / "metrics.json").read_text())["heldout_loss"] != final["heldout_loss"]
    summary = json.loads((out / "eval.json").read_text())
    assert [t["label"] for t in summary["tests"]] == ["test_a", "test_b"] and summary["eval"]["max_new_tokens"] == 8


def test_a_run_beside_its_base_model_gets_paired_bootstrap_intervals(scored_run, capsys):
    root = scored_run.parents[2]
    answered = read_jsonl(scored_run / "predictions.jsonl")
    assert all(p["prediction"] for p in answered)  # premise: the adapter answers in words
    # Two questions whose reference is the adapter's own answer, one with the real answer: per-question
    # ROUGE-L differences 1, 1 and about 0, so the interval has width.
    write_jsonl(root / "own.jsonl", [{"question": p["question"], "answer": p["prediction"] if i < 2 else
                                      p["reference"]} for i, p in enumerate(answered)])
    assert main(["eval", str(scored_run), "--base", "--test", str(root / "own.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert "| r1 - base (95% CI) |" in " ".join(printed.split())
    (out,) = scored_run.parent.glob("eval-*")  # the default folder: beside the run
    summary = json.loads((out / "eval.json").read_text())
    gain = summary["differences"]["own"]["r1"]["rougeL"]
    low, high = gain["ci95"]
    assert low < high and low <= gain["difference"] <= high and gain["difference"] > 0.5
    assert f"{gain['difference']:+.4f} [{low:+.4f}, {high:+.4f}]" in printed
    loss = summary["differences"]["own"]["r1"]["heldout_loss"]  # from each question's loss (item_scores.json)
    assert loss["ci95"][0] <= loss["difference"] <= loss["ci95"][1] and loss["ci95"][0] < loss["ci95"][1]
    items = json.loads((out / "r1" / "own" / "item_scores.json").read_text())["heldout"]
    assert [r["question"] for r in items] == [p["question"] for p in answered]


def test_eval_scores_the_seeded_subset_of_max_test_samples_a_run_would(scored_run, tmp_path, caplog):
    from fedpeft.data.federated import cap_rows

    root, out = scored_run.parents[2], tmp_path / "out"
    assert main(["eval", str(scored_run), "--test", str(root / "test_b.jsonl"), "--out", str(out),
                 "data.max_test_samples=2"]) == 0
    rows = read_jsonl(root / "test_b.jsonl")
    kept = [r["question"] for r in cap_rows(rows, 2, 0 + 1)]  # the run's seed 0; data.test is capped with seed + 1
    assert [p["question"] for p in read_jsonl(out / "r1" / "test_b" / "predictions.jsonl")] == kept
    assert json.loads((out / "eval.json").read_text())["tests"][0] == {
        "label": "test_b", "file": str(root / "test_b.jsonl"), "rows": 2, "rows_in_file": 4}
    assert "scoring 2 of its 4 rows" in caplog.text


def test_trailing_overrides_change_the_jobs_eval_settings(scored_run, tmp_path):
    root = scored_run.parents[2]
    out = tmp_path / "out"
    assert main(["eval", str(scored_run / "adapter"), "--test", str(root / "test_b.jsonl"), "--out", str(out),
                 "eval.max_samples=1", "eval.heldout_loss=false"]) == 0
    assert len(read_jsonl(out / "r1" / "test_b" / "predictions.jsonl")) == 1
    assert "heldout_loss" not in json.loads((out / "r1" / "test_b" / "metrics.json").read_text())


def test_adapters_of_other_methods_take_turns_on_one_base_model(scored_run, make_adapter, tmp_path):
    test, out = scored_run.parents[2] / "test_a.jsonl", tmp_path / "out"
    ia3 = make_adapter("ia3")  # untrained: IA3 scales by ones, so it answers as the base model does
    assert main(["eval", str(scored_run), str(ia3), "--base", "--test", str(test), "--out", str(out)]) == 0
    results = json.loads((out / "eval.json").read_text())["results"]["test_a"]
    assert list(results) == ["base", "r1", "ia3-adapter"]
    zero_shot, final = (r["eval"] for r in read_jsonl(scored_run / "metrics.jsonl"))
    assert _quality(results["base"]) == _quality(zero_shot) and _quality(results["r1"]) == _quality(final)
    assert _quality(results["ia3-adapter"]) == _quality(zero_shot)  # the LoRA adapter left the base as it was


def test_a_job_yaml_with_base_scores_its_base_model_alone(scored_run, tmp_path):
    root, out = scored_run.parents[2], tmp_path / "out"
    assert main(["eval", str(root / "job.yaml"), "--base", "--test", str(root / "test_a.jsonl"),
                 "--out", str(out)]) == 0
    zero_shot = read_jsonl(scored_run / "metrics.jsonl")[0]["eval"]
    assert _quality(json.loads((out / "base" / "test_a" / "metrics.json").read_text())) == _quality(zero_shot)
    assert [c["label"] for c in json.loads((out / "eval.json").read_text())["columns"]] == ["base"]


def _foreign_adapter(run: Path, tmp_path: Path) -> Path:
    other = tmp_path / "other"
    shutil.copytree(run / "adapter", other)
    info = json.loads((other / "fedpeft_model.json").read_text())
    info["model"]["name"] = "another-model"
    (other / "fedpeft_model.json").write_text(json.dumps(info))
    return other


@pytest.mark.parametrize("case", ["missing", "no_fields", "no_answer", "foreign", "out_full", "override"])
def test_errors_are_one_line_naming_the_file_and_what_to_do(scored_run, tmp_path, capsys, case):
    test = scored_run.parents[2] / "test_a.jsonl"
    args, message = [str(scored_run), "--test", str(test)], ""
    if case == "missing":
        args[-1] = str(tmp_path / "nope.jsonl")
        message = f"--test {tmp_path / 'nope.jsonl'}: no such file"
    elif case == "no_fields":
        (tmp_path / "t.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
        args[-1], message = str(tmp_path / "t.jsonl"), f"{tmp_path / 't.jsonl'}:1: cannot tell which fields"
    elif case == "no_answer":
        (tmp_path / "t.jsonl").write_text('{"question": "a", "answer": "b"}\n{"question": "c"}\n')
        args[-1], message = str(tmp_path / "t.jsonl"), f"{tmp_path / 't.jsonl'}:2: missing answer field"
    elif case == "foreign":
        args.insert(1, str(_foreign_adapter(scored_run, tmp_path)))
        message = "base model has name 'another-model' (not 'tiny-random-llama')"
    elif case == "out_full":
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "x").write_text("x")
        args += ["--out", str(tmp_path / "full")]
        message = "already holds files"
    else:
        args += ["model.name=gpt2"]
        message = "'model.name=gpt2' is not an evaluation setting"
    before = sorted(scored_run.parent.iterdir())
    assert main(["eval", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0, err
    assert sorted(scored_run.parent.iterdir()) == before  # no results folder left behind
