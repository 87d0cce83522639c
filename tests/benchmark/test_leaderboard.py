"""Leaderboard rows, columns and order from hand-written test case records (no model runs)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fedpeft.benchmark.leaderboard import build_board, select, sort_rows, write_board
from fedpeft.benchmark.leaderboard_command import print_leaderboards
from fedpeft.errors import ConfigError

META = {
    "name": "job", "source": "job.yaml",
    "metrics": [{"column": "rougel_metric", "key": "rougeL"}, {"column": "bleu4_metric", "key": "bleu4"}],
    "modules": ["basemodel", "aggregation"],
    "hyperparameters": ["basemodel-peft_method", "aggregation-beta"],
    "rank": {"sort_by": [{"rougel_metric": "descend"}, {"heldout_loss": "ascend"}],
             "visualization": {"mode": "selected_only", "method": "print_table"},
             "selected_dataitem": {"paradigms": ["federatedlearning"], "modules": ["aggregation"],
                                   "hyperparameters": ["basemodel-peft_method"],
                                   "metrics": ["rougel_metric", "pct_of_centralized"]},
             "save_mode": "selected_and_all"},
}


def _record(job_dir: Path, kind: str, algorithm: str, rouge: float | None, loss: float, *, group: str = "g1",
            session: str = "s1", client: str | None = None, time: str = "2025-01-01 00:00:00", peft: str = "lora",
            beta: float | None = None) -> dict:
    folder = {"federated": algorithm}.get(kind, kind)
    run = job_dir / folder / f"{algorithm}-{rouge}-{loss}-{session}".replace(" ", "_")
    run.mkdir(parents=True)
    hyper = {"basemodel-peft_method": peft} if kind != "zero_shot" else {}
    if beta is not None:
        hyper["aggregation-beta"] = beta
    rec = {"kind": kind, "session": session, "algorithm": algorithm, "group": group, "client": client,
           "paradigm": "federatedlearning" if kind == "federated" else "baseline",
           "modules": {"basemodel": "m", "aggregation": "FedAvgM-PEFT" if beta is not None else ""},
           "hyperparameters": hyper, "metrics": {"rougel_metric": rouge, "bleu4_metric": 0.01},
           "extra": {"rounds": 2, "clients": 4 if kind == "federated" else 1, "trainable_parameters": 10,
                     "bytes_per_round": 80 if kind == "federated" else 0, "wall_seconds": 1.5,
                     "peak_memory_mb": 100.0, "heldout_loss": loss},
           "time": time, "url": str(run)}
    (run / "testcase.json").write_text(json.dumps(rec))
    return rec


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    job = tmp_path / "ws" / "job"
    job.mkdir(parents=True)
    (job / "benchmark.json").write_text(json.dumps(META))
    _record(job, "federated", "fedavgm-peft", 0.30, 2.0, beta=0.7)
    _record(job, "federated", "fedavgm-peft", 0.20, 2.5, beta=0.7, peft="ptuning", group="g2")
    _record(job, "federated", "fedavg-peft", 0.30, 1.8)
    _record(job, "zero_shot", "zero_shot", 0.10, 3.0, group="z")
    _record(job, "centralized", "centralized", 0.40, 1.5)
    _record(job, "local_only", "local_only client-0", 0.25, 2.2, client="client-0")
    _record(job, "local_only", "local_only client-1", 0.15, 2.6, client="client-1")
    _record(job, "federated", "fedavg-peft", None, 9.9, peft="ptuning", group="g2")
    return job


def test_rows_are_sorted_by_every_sort_key_with_missing_values_last(job_dir):
    board, _ = build_board(job_dir)
    got = [(r["rank"], r["algorithm"], r["rougel_metric"], r["heldout_loss"]) for r in board.rows]
    assert got == [
        (1, "centralized", 0.40, 1.5),
        (2, "fedavg-peft", 0.30, 1.8),  # ties on rougeL: lower held-out loss first
        (3, "fedavgm-peft", 0.30, 2.0),
        (4, "local_only client-0", 0.25, 2.2),
        (5, "local_only (mean)", pytest.approx(0.20), pytest.approx(2.4)),
        (6, "fedavgm-peft", 0.20, 2.5),
        (7, "local_only client-1", 0.15, 2.6),
        (8, "local_only (worst)", 0.15, 2.6),  # per column: the lowest rougeL, the highest loss
        (9, "zero_shot", 0.10, 3.0),
        (10, "fedavg-peft", None, 9.9),  # missing metric: last
    ]
    mean = next(r for r in board.rows if r["algorithm"] == "local_only (mean)")
    assert mean["rougel_metric"] == pytest.approx(0.20) and mean["clients"] == 1 and mean["rounds"] == 2


def test_a_tie_as_the_table_shows_it_is_broken_by_the_next_sort_key(job_dir):
    _record(job_dir, "federated", "fedavgm-peft", 0.30004, 2.1, beta=0.5)  # shown as 0.3000, like 0.30
    board, meta = build_board(job_dir)
    got = [(r["algorithm"], board.cell(r, "rougel_metric"), r["heldout_loss"]) for r in board.rows[1:4]]
    assert got == [("fedavg-peft", "0.3000", 1.8), ("fedavgm-peft", "0.3000", 2.0), ("fedavgm-peft", "0.3000", 2.1)]
    assert [r["heldout_loss"] for r in select(board, meta).rows[:3]] == [1.8, 2.0, 2.1]


def test_selected_rank_drops_rows_that_read_the_same_in_every_selected_column(job_dir):
    # A re-run reproducing its numbers, and a run differing only in a column not selected (beta):
    # Ianvs's selected_rank keeps the first of them (drop_duplicates), all_rank keeps every row.
    _record(job_dir, "federated", "fedavgm-peft", 0.30, 2.0, beta=0.7, session="s2", time="2025-01-02 00:00:00")
    _record(job_dir, "federated", "fedavgm-peft", 0.30, 2.0, beta=0.5, session="s3", time="2025-01-03 00:00:00")
    board, meta = build_board(job_dir)
    assert sum(r["algorithm"] == "fedavgm-peft" and r["rougel_metric"] == 0.30 for r in board.rows) == 3
    selected = select(board, meta)
    assert [(r["rank"], r["algorithm"], r["rougel_metric"]) for r in selected.rows] == [
        (1, "fedavg-peft", 0.30), (2, "fedavgm-peft", 0.30), (3, "fedavgm-peft", 0.20), (4, "fedavg-peft", None)]
    assert selected.rows[1]["time"] == "2025-01-01 00:00:00"  # the first, as pandas' drop_duplicates keeps


def test_pct_of_centralized_compares_rows_trained_the_same_way(job_dir):
    board, _ = build_board(job_dir)
    pct = {(r["algorithm"], r.get("basemodel-peft_method")): r["pct_of_centralized"] for r in board.rows}
    assert pct[("centralized", "lora")] == 100.0
    assert pct[("fedavgm-peft", "lora")] == 75.0  # 0.30 / 0.40 of the same training setup (group g1)
    assert pct[("fedavgm-peft", "ptuning")] is None  # no centralised row for group g2
    assert pct[("zero_shot", None)] is None


def test_columns_follow_the_documented_order(job_dir):
    board, meta = build_board(job_dir)
    assert board.columns == [
        "rank", "algorithm", "rougel_metric", "bleu4_metric", "paradigm", "basemodel", "aggregation",
        "basemodel-peft_method", "aggregation-beta", "rounds", "clients", "trainable_parameters",
        "bytes_per_round", "wall_seconds", "peak_memory_mb", "heldout_loss", "pct_of_centralized", "time", "url"]
    selected = select(board, meta)
    assert selected.columns == ["rank", "algorithm", "rougel_metric", "paradigm", "aggregation",
                                "basemodel-peft_method", "pct_of_centralized", "time", "url"]
    assert {r["paradigm"] for r in selected.rows} == {"federatedlearning"}
    assert [r["rank"] for r in selected.rows] == [1, 2, 3, 4]


def test_csv_and_markdown_files_and_rerun_adds_rows_without_duplicates(job_dir):
    write_board(job_dir)
    with open(job_dir / "rank" / "all_rank.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and rows[0]["algorithm"] == "centralized" and rows[0]["rougel_metric"] == "0.4"
    md = (job_dir / "rank" / "selected_rank.md").read_text().splitlines()
    assert [c.strip() for c in md[0].strip("|").split("|")][:3] == ["rank", "algorithm", "rougel_metric"]
    assert len(md) == 2 + 4 and all(line.count("|") == md[0].count("|") for line in md)  # header, rule, 4 rows
    _record(job_dir, "federated", "fedavgm-peft", 0.35, 2.0, beta=0.7, session="s2", time="2025-01-02 00:00:00")
    write_board(job_dir)
    with open(job_dir / "rank" / "all_rank.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 11 and len({r["url"] for r in rows if r["algorithm"] != "local_only (mean)"}) == 10
    assert rows[1]["rougel_metric"] == "0.35"


def test_sort_rows_handles_ascend_descend_and_missing():
    rows = [{"a": 1, "b": 2}, {"a": None, "b": 0}, {"a": 1, "b": 1}, {"a": 3}]
    assert sort_rows(rows, [("a", "descend"), ("b", "ascend")]) == [rows[3], rows[2], rows[0], rows[1]]
    close = [{"m": 0.50001, "b": 2}, {"m": 0.5, "b": 1}]
    assert sort_rows(close, [("m", "descend"), ("b", "ascend")], frozenset({"m"})) == [close[1], close[0]]
    assert sort_rows(close, [("m", "descend"), ("b", "ascend")]) == close  # not a metric: every digit counts


def test_leaderboard_command_prints_and_checks_sort_names(job_dir, capsys):
    from rich.console import Console

    console = Console(width=400, record=True)
    assert print_leaderboards(job_dir.parent, ["heldout_loss"], show_all=True, console=console) == 0
    text = console.export_text()
    lines = [ln for ln in text.splitlines() if "│" in ln]
    assert "centralized" in lines[0] and "1.5000" in lines[0]  # lowest held-out loss first
    with pytest.raises(ConfigError, match="did you mean 'heldout_loss'"):
        print_leaderboards(job_dir, ["heldout_los"])
    with pytest.raises(ConfigError, match="no benchmark job"):
        print_leaderboards(job_dir / "rank")
