"""vs_zero_shot and vs_centralized: paired bootstrap intervals of the leaderboard's differences,
from hand-written run folders with predictions (no model runs)."""

from __future__ import annotations

import json
from pathlib import Path

from fedpeft.benchmark.leaderboard import build_board
from fedpeft.metrics import paired_bootstrap_ci

META = {
    "name": "paired", "source": "job.yaml", "metrics": [{"column": "rougel_metric", "key": "rougeL"}],
    "modules": ["basemodel"], "hyperparameters": [],
    "rank": {"sort_by": [{"rougel_metric": "descend"}], "save_mode": "selected_and_all",
             "selected_dataitem": {"paradigms": ["all"], "modules": ["all"], "hyperparameters": ["all"],
                                   "metrics": ["all"]}},
}
REFS = [f"the answer to question {i} is word{i} and more words" for i in range(12)]
ANSWERS = {  # kind -> one prediction per question
    "zero_shot": ["nothing useful here"] * 12,
    "centralized": [r if i % 2 == 0 else "the answer is unknown" for i, r in enumerate(REFS)],
    "federated": [r if i % 3 else "no idea" for i, r in enumerate(REFS)],
}


def _case(job: Path, kind: str) -> Path:
    run = job / kind / "run"
    run.mkdir(parents=True)
    (run / "testcase.json").write_text(json.dumps({
        "kind": kind, "session": "s1", "algorithm": "fedavg" if kind == "federated" else kind, "group": "g1",
        "paradigm": "federatedlearning" if kind == "federated" else "baseline", "modules": {"basemodel": "m"},
        "hyperparameters": {}, "metrics": {"rougel_metric": 0.5}, "extra": {}, "time": "2025-01-01 00:00:00",
        "url": str(run), "_dir": str(run)}))
    (run / "summary.json").write_text(json.dumps({"rounds": 2, "final": {}}))
    (run / "metrics.jsonl").write_text("")
    name = "predictions_zero_shot.jsonl" if kind == "zero_shot" else "predictions.jsonl"
    (run / name).write_text("".join(json.dumps({"question": f"q{i}", "reference": r, "prediction": p}) + "\n"
                                    for i, (r, p) in enumerate(zip(REFS, ANSWERS[kind]))))
    return run


def test_each_difference_comes_with_its_paired_interval(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "benchmark.json").write_text(json.dumps(META))
    for kind in ANSWERS:
        _case(job, kind)
    board, _ = build_board(job)
    rows = {r["algorithm"]: r for r in board.rows}
    assert {"vs_zero_shot", "vs_centralized"} <= set(board.columns)
    low, high = paired_bootstrap_ci("rougeL", predictions=ANSWERS["federated"], baseline=ANSWERS["zero_shot"],
                                    references=REFS)
    cell = rows["fedavg"]["vs_zero_shot"]
    assert cell.endswith(f"[{low:+.4f}, {high:+.4f}]") and low > 0  # the federated run beats zero-shot
    assert rows["fedavg"]["vs_centralized"].startswith(("+", "-"))
    assert rows["centralized"]["vs_zero_shot"] and rows["centralized"].get("vs_centralized") is None
    assert rows["zero_shot"].get("vs_zero_shot") is None


def test_the_report_draws_per_site_scores_when_runs_have_them(tmp_path):
    from fedpeft.benchmark.report import render_report, sites_figure

    job = tmp_path / "job"
    job.mkdir()
    (job / "benchmark.json").write_text(json.dumps(META))
    runs = {kind: _case(job, kind) for kind in ANSWERS}
    assert "Per-site scores" not in render_report(job)  # no run scored sites: no section
    for n, run in enumerate(runs.values()):
        sites = {f"client-{i}": {"n": 3, "heldout_loss": 2.0 + n + i, "personal/heldout_loss": 1.5 + i} for i in (0, 1)}
        (run / "metrics.jsonl").write_text(json.dumps({"round": 2, "event": "round", "clients": [], "sites": sites}) + "\n")
    page = render_report(job)
    assert "Per-site scores" in page and page.count("data:image/png;base64") >= 2
    board, _ = build_board(job)
    assert sites_figure(board.rows, {i: f"row {i}" for i in range(len(board.rows))}).startswith("iVBOR")  # a PNG


LOSS_PER_TOKEN = {"zero_shot": 3.0, "centralized": 2.0, "federated": 2.5}  # nats per answer token, every question


def test_held_out_loss_and_mcq_differences_get_paired_intervals_from_item_scores(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "benchmark.json").write_text(json.dumps(META))
    for kind, loss in LOSS_PER_TOKEN.items():
        run = _case(job, kind)
        right = {"zero_shot": 3, "centralized": 9, "federated": 8}[kind]  # of 12 items
        items = {"heldout": [{"question": f"q{i}", "nll": loss * (i + 1), "tokens": i + 1} for i in range(12)],
                 "mcq": [{"question": f"m{i}", "chosen": 0, "answer": 0 if i < right else 1} for i in range(12)]}
        name = "item_scores_zero_shot.json" if kind == "zero_shot" else "item_scores.json"
        (run / name).write_text(json.dumps(items))
    board, _ = build_board(job)
    rows = {r["algorithm"]: r for r in board.rows}
    assert {"loss_vs_zero_shot", "loss_vs_centralized", "mcq_vs_zero_shot", "mcq_vs_centralized"} <= set(board.columns)
    # every question's loss moved by the same amount: the interval is that amount exactly
    assert rows["fedavg"]["loss_vs_zero_shot"] == "-0.5000 [-0.5000, -0.5000]"
    assert rows["fedavg"]["loss_vs_centralized"] == "+0.5000 [+0.5000, +0.5000]"
    assert rows["centralized"]["loss_vs_zero_shot"] == "-1.0000 [-1.0000, -1.0000]"
    cell = rows["fedavg"]["mcq_vs_zero_shot"]  # 8 vs 3 of 12 right
    diff, low, high = (float(x) for x in cell.replace("[", "").replace("]", "").replace(",", "").split())
    assert diff == round(5 / 12, 4) and 0 < low <= diff <= high <= 1
    assert rows["zero_shot"].get("loss_vs_zero_shot") is None and rows["centralized"].get("mcq_vs_centralized") is None
