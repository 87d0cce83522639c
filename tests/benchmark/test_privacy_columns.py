"""Epsilon in the leaderboard and the report, from hand-written run folders (no model runs):
``summary.json`` and ``metrics.jsonl`` as :mod:`fedpeft.rounds` writes them with and without DP."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from rich.console import Console

from fedpeft.benchmark import report
from fedpeft.benchmark.leaderboard import build_board, write_board
from fedpeft.benchmark.leaderboard_command import parse_sort_by, print_leaderboards
from fedpeft.benchmark.report import write_report
from fedpeft.errors import ConfigError

META = {
    "name": "dp-job", "source": "job.yaml", "metrics": [{"column": "rougel_metric", "key": "rougeL"}],
    "modules": ["basemodel"], "hyperparameters": ["privacy-noise_multiplier"],
    "rank": {"sort_by": [{"rougel_metric": "descend"}], "save_mode": "selected_and_all",
             # epsilon is not selected: a DP job shows it anyway
             "selected_dataitem": {"paradigms": ["all"], "modules": ["all"], "hyperparameters": ["all"],
                                   "metrics": ["rougel_metric"]}},
}
# name -> (kind, final rougeL, epsilon per round or None without DP, privacy entry of summary.json)
CLIENT_DP = {"level": "client", "delta": 1e-5, "accountant": "rdp", "noise_multiplier": 1.0, "clip_norm": 0.5,
             "target_epsilon": 3.0, "stopped_before_round": None}
EXAMPLE_DP = {"level": "example", "delta": 1e-5, "accountant": "rdp", "max_grad_norm": 1.0,
              "target_epsilon": 8.0, "stopped_before_round": 3, "client_epsilon": {"client-0": 7.5, "client-1": 7.9}}
CASES = {
    "client-dp": ("federated", 0.25, [1.2, 2.5], CLIENT_DP),
    "example-dp": ("federated", 0.20, [4.1, 7.9], EXAMPLE_DP),
    "no-dp": ("federated", 0.30, None, None),
    "centralized": ("centralized", 0.35, None, None),
    "zero_shot": ("zero_shot", 0.05, None, None),
}


def _run(job: Path, name: str, dp: bool) -> None:
    """One test case folder: ``testcase.json``, ``summary.json``, ``metrics.jsonl``."""
    kind, rouge, epsilons, privacy = CASES[name]
    if not dp:
        epsilons, privacy = None, None
    run = job / kind / name
    run.mkdir(parents=True)
    noise = privacy.get("noise_multiplier", 0.8) if privacy else None
    (run / "testcase.json").write_text(json.dumps({
        "kind": kind, "session": "s1", "algorithm": f"fedavg-{name}" if kind == "federated" else kind,
        "group": "g1", "paradigm": "federatedlearning" if kind == "federated" else "baseline",
        "modules": {"basemodel": "m"}, "hyperparameters": {"privacy-noise_multiplier": noise},
        "metrics": {"rougel_metric": rouge}, "extra": {"rounds": 2, "heldout_loss": 2.0 - rouge},
        "time": "2025-01-01 00:00:00", "url": str(run)}))
    summary: dict = {"rounds": 2, "final": {"rougeL": rouge}}
    if privacy:
        summary.update(epsilon=epsilons[-1], privacy={**privacy, "epsilon": epsilons[-1]})
    (run / "summary.json").write_text(json.dumps(summary))
    records = [{"event": "round", "round": r, "eval": {"rougeL": rouge * r / 2},
                "clients": [{"client_id": "client-0", "train_loss": 3.0 - r}]} for r in (1, 2)]
    for record, eps in zip(records, epsilons or []):
        record.update(epsilon=eps, privacy={k: privacy[k] for k in ("level", "delta", "accountant")})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _job(tmp_path: Path, dp: bool) -> Path:
    job = tmp_path / ("dp" if dp else "plain") / "job"
    job.mkdir(parents=True)
    (job / "benchmark.json").write_text(json.dumps(META))
    for name in CASES:
        _run(job, name, dp)
    return job


@pytest.fixture
def dp_job(tmp_path: Path) -> Path:
    return _job(tmp_path, dp=True)


@pytest.fixture
def plain_job(tmp_path: Path) -> Path:
    return _job(tmp_path, dp=False)


def _by_algorithm(board) -> dict[str, dict]:
    return {r["algorithm"]: r for r in board.rows}


def test_epsilon_and_dp_columns_come_from_each_summary(dp_job):
    board, _ = build_board(dp_job)
    assert board.columns[-4:] == ["epsilon", "dp", "time", "url"]
    rows = _by_algorithm(board)
    got = {a: (r["epsilon"], r["dp"], board.cell(r, "epsilon")) for a, r in rows.items()}
    assert got == {
        "fedavg-client-dp": (2.5, "client, δ=1e-05", "2.50"),
        "fedavg-example-dp": (7.9, "example, δ=1e-05, stopped before round 3 (target ε 8)", "7.90"),
        "fedavg-no-dp": (math.inf, "none", "∞"),  # no DP: no guarantee
        "centralized": (math.inf, "none", "∞"),
        "zero_shot": (0.0, "no training", "0.00"),  # trained on nothing
    }


def test_epsilon_sorts_like_a_cost(dp_job):
    assert parse_sort_by(["epsilon"]) == [("epsilon", "ascend")]  # lower is more private
    board, _ = build_board(dp_job, parse_sort_by(["epsilon", "rougel_metric"]))
    assert [(r["algorithm"], r["epsilon"]) for r in board.rows] == [
        ("zero_shot", 0.0), ("fedavg-client-dp", 2.5), ("fedavg-example-dp", 7.9),
        ("centralized", math.inf), ("fedavg-no-dp", math.inf)]  # ∞ ties: by rougeL


def test_rank_files_and_terminal_table_show_epsilon(dp_job):
    write_board(dp_job)
    for name in ("all_rank", "selected_rank"):  # selected_dataitem did not list it: shown anyway
        with open(dp_job / "rank" / f"{name}.csv", encoding="utf-8") as f:
            rows = {r["algorithm"]: r for r in csv.DictReader(f)}
        assert rows["fedavg-client-dp"]["epsilon"] == "2.5" and rows["fedavg-no-dp"]["epsilon"] == "inf", name
        assert float(rows["centralized"]["epsilon"]) == math.inf  # CSV readers parse it
        assert rows["fedavg-example-dp"]["dp"].startswith("example, δ=1e-05")
        md = (dp_job / "rank" / f"{name}.md").read_text(encoding="utf-8")
        assert "| ∞ " in md and "∞: trained without differential privacy, no guarantee" in md
    out = io.StringIO()
    print_leaderboards(dp_job, console=Console(file=out, width=400))
    assert "epsilon" in out.getvalue() and "∞" in out.getvalue() and "no guarantee" in out.getvalue()


def test_no_dp_anywhere_adds_no_column(plain_job):
    board, _ = build_board(plain_job)
    assert "epsilon" not in board.columns and "dp" not in board.columns and board.notes() == []
    write_board(plain_job)
    assert "∞" not in (plain_job / "rank" / "selected_rank.md").read_text(encoding="utf-8")
    with pytest.raises(ConfigError, match="no test case .* trained with differential privacy"):
        print_leaderboards(plain_job, sort_by=["epsilon"], console=Console(file=io.StringIO()))


def _images(text: str) -> list[str]:
    return re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)


def test_report_has_privacy_charts_only_with_dp(dp_job, plain_job):
    with_dp, without = write_report(dp_job).read_text(), write_report(plain_job).read_text()
    for needle in ("Privacy", "Epsilon vs round", "Score vs epsilon"):
        assert f">{needle}<" in with_dp and f">{needle}<" not in without, needle
    assert len(_images(with_dp)) == len(_images(without)) + 2
    assert "<th>epsilon</th>" in with_dp and "<td>∞</td>" in with_dp and "no guarantee" in with_dp
    assert "epsilon" not in without


@pytest.fixture
def figures(monkeypatch) -> list[plt.Figure]:
    """Every figure the report draws, kept open instead of turned into PNG text."""
    drawn: list[plt.Figure] = []
    monkeypatch.setattr(report, "_png", lambda fig: drawn.append(fig) or "png")
    yield drawn
    plt.close("all")


def test_epsilon_vs_round_draws_one_line_per_dp_run(dp_job, figures):
    board, _ = build_board(dp_job)
    labels = {i: r["algorithm"] for i, r in enumerate(board.rows)}
    assert report.epsilon_figure(board.rows, labels) == "png"
    ax = figures[0].axes[0]
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines() if not ln.get_label().startswith("_")}
    assert lines == {"fedavg-client-dp (client, δ=1e-05)": [0.0, 1.2, 2.5],
                     "fedavg-example-dp (example, δ=1e-05)": [0.0, 4.1, 7.9]}  # nothing spent at round 0
    targets = sorted(line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == "--")
    assert targets == [3.0, 8.0]


def test_score_vs_epsilon_puts_runs_without_dp_at_infinity(dp_job, figures):
    board, _ = build_board(dp_job)
    labels = {i: r["algorithm"] for i, r in enumerate(board.rows)}
    assert report.score_epsilon_figure(board.rows, labels, "rougel_metric") == "png"
    main, side = figures[0].axes[:2]
    finite = sorted(tuple(p) for c in main.collections for p in c.get_offsets())
    assert finite == [(2.5, 0.25), (7.9, 0.20)]
    assert sorted(float(p[1]) for c in side.collections for p in c.get_offsets()) == [0.30, 0.35]
    assert [t.get_text() for t in side.get_xticklabels()] == ["∞"]
    assert any(line.get_ydata()[0] == 0.05 for line in main.get_lines())  # zero-shot reference


def test_no_dp_figures_without_dp(plain_job, figures):
    board, _ = build_board(plain_job)
    labels = {i: r["algorithm"] for i, r in enumerate(board.rows)}
    assert report.epsilon_figure(board.rows, labels) is None
    assert report.score_epsilon_figure(board.rows, labels, "rougel_metric") is None
