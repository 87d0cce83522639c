"""Paired bootstrap intervals of the differences the leaderboard reports: each row vs zero-shot and
vs the centralised baseline, on the first generation metric.

Both runs of a pair answered the same test questions (the leaderboard's test cases share their
test set; the rows are matched by the list of questions in their ``predictions.jsonl``), so the
interval comes from :func:`fedpeft.metrics.paired_bootstrap_ci`: each resample draws questions
once and scores both runs' answers to them (1000 resamples, seeded, 95 %). A cell reads
``+0.0123 [+0.0040, +0.0210]``; an interval above 0 means the row scores higher. Rows without
predictions (the ``local_only`` summaries) or without a partner get no cell.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedpeft.benchmark.constants import CENTRALIZED, COL_VS_CENTRALIZED, COL_VS_ZERO_SHOT, ZERO_SHOT
from fedpeft.constants import PREDICTIONS_FILE, PREDICTIONS_ZERO_SHOT_FILE
from fedpeft.metrics import METRICS, compute_metrics, paired_bootstrap_ci


def add_paired_cis(rows: list[dict], meta: dict) -> None:
    """Set ``vs_zero_shot`` and ``vs_centralized`` on every row that has both runs' predictions."""
    metric = next((m["key"] for m in meta.get("metrics", []) if str(m["key"]).lower() in METRICS.names()), None)
    if metric is None:
        return
    answers = {id(r): _predictions(r) for r in rows}
    zero_shot = {_questions(p): p for r in rows if r.get("_kind") == ZERO_SHOT and (p := answers[id(r)])}
    central = {}
    for r in rows:
        if r.get("_kind") == CENTRALIZED and answers[id(r)]:
            central[(r.get("_group"), _questions(answers[id(r)]))] = answers[id(r)]
    for r in rows:
        mine = answers[id(r)]
        if not mine:
            continue
        if r.get("_kind") != ZERO_SHOT:
            r[COL_VS_ZERO_SHOT] = _cell(metric, mine, zero_shot.get(_questions(mine)))
        if r.get("_kind") not in (ZERO_SHOT, CENTRALIZED):
            r[COL_VS_CENTRALIZED] = _cell(metric, mine, central.get((r.get("_group"), _questions(mine))))


def _predictions(row: dict) -> list[dict] | None:
    folder = row.get("_dir")
    if not folder:
        return None
    for name in (PREDICTIONS_FILE, PREDICTIONS_ZERO_SHOT_FILE):
        path = Path(folder) / name
        if path.is_file():
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return None


def _questions(predictions: list[dict]) -> tuple[str, ...]:
    return tuple(p["question"] for p in predictions)


def _cell(metric: str, mine: list[dict], other: list[dict] | None) -> str | None:
    """``difference [low, high]`` of ``metric(mine) - metric(other)``; None without a partner."""
    if not other:
        return None
    refs = [p["reference"] for p in mine]
    ours, theirs = [p["prediction"] for p in mine], [p["prediction"] for p in other]
    diff = (compute_metrics([metric], predictions=ours, references=refs)[metric]
            - compute_metrics([metric], predictions=theirs, references=refs)[metric])
    low, high = paired_bootstrap_ci(metric, predictions=ours, baseline=theirs, references=refs)
    return f"{diff:+.4f} [{low:+.4f}, {high:+.4f}]"
