"""Paired bootstrap intervals of the differences the leaderboard reports: each row vs zero-shot and
vs the centralised baseline, on the first generation metric.

Both runs of a pair answered the same test questions (the leaderboard's test cases share their
test set; the rows are matched by the list of questions in their ``predictions.jsonl``), so the
interval comes from :func:`fedpeft.metrics.paired_bootstrap_ci`: each resample draws questions
once and scores both runs' answers to them (1000 resamples, seeded, 95 %). A cell reads
``+0.0123 [+0.0040, +0.0210]``; an interval above 0 means the row scores higher. Rows without
predictions (the ``local_only`` summaries) or without a partner get no cell.

The held-out loss (``loss_vs_*``: below 0 is better) and multiple-choice accuracy (``mcq_vs_*``)
get the same paired intervals from the runs' per-item scores (``item_scores.json``: each test
question's loss, each item's choice; :mod:`fedpeft.metrics.items`), matched by their questions.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedpeft.benchmark.constants import (
    CENTRALIZED,
    COL_LOSS_VS_CENTRALIZED,
    COL_LOSS_VS_ZERO_SHOT,
    COL_MCQ_VS_CENTRALIZED,
    COL_MCQ_VS_ZERO_SHOT,
    COL_VS_CENTRALIZED,
    COL_VS_ZERO_SHOT,
    ZERO_SHOT,
)
from fedpeft.constants import (
    ITEM_SCORES_FILE,
    ITEM_SCORES_ZERO_SHOT_FILE,
    KEY_HELDOUT_LOSS,
    KEY_MCQ_ACCURACY,
    PREDICTIONS_FILE,
    PREDICTIONS_ZERO_SHOT_FILE,
)
from fedpeft.metrics import METRICS, compute_metrics, paired_bootstrap_ci
from fedpeft.metrics.items import ITEM_KEYS, item_value, paired_item_ci

ITEM_COLUMNS = {KEY_HELDOUT_LOSS: (COL_LOSS_VS_ZERO_SHOT, COL_LOSS_VS_CENTRALIZED),
                KEY_MCQ_ACCURACY: (COL_MCQ_VS_ZERO_SHOT, COL_MCQ_VS_CENTRALIZED)}


def add_paired_cis(rows: list[dict], meta: dict) -> None:
    """Set ``vs_zero_shot`` and ``vs_centralized`` on every row that has both runs' predictions, and
    the ``loss_vs_*`` / ``mcq_vs_*`` cells on every row that has both runs' per-item scores."""
    _add_item_cis(rows)
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


def _add_item_cis(rows: list[dict]) -> None:
    items = {id(r): _items(r) for r in rows}
    for metric, (vs_zero, vs_central) in ITEM_COLUMNS.items():
        key = ITEM_KEYS[metric]
        mine = {id(r): i for r in rows if (i := items[id(r)]) and i.get(key)}
        zero = {_item_questions(i, key): i for r in rows if r.get("_kind") == ZERO_SHOT and (i := mine.get(id(r)))}
        central = {(r.get("_group"), _item_questions(i, key)): i for r in rows
                   if r.get("_kind") == CENTRALIZED and (i := mine.get(id(r)))}
        for r in rows:
            if (i := mine.get(id(r))) is None:
                continue
            questions = _item_questions(i, key)
            if r.get("_kind") != ZERO_SHOT:
                r[vs_zero] = _item_cell(metric, i, zero.get(questions))
            if r.get("_kind") not in (ZERO_SHOT, CENTRALIZED):
                r[vs_central] = _item_cell(metric, i, central.get((r.get("_group"), questions)))


def _items(row: dict) -> dict | None:
    folder = row.get("_dir")
    for name in (ITEM_SCORES_FILE, ITEM_SCORES_ZERO_SHOT_FILE) if folder else ():
        path = Path(folder) / name
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
    return None


def _item_questions(items: dict, key: str) -> tuple[str, ...]:
    return tuple(r["question"] for r in items[key])


def _item_cell(metric: str, mine: dict, other: dict | None) -> str | None:
    ci = paired_item_ci(metric, mine, other) if other else None
    if ci is None:
        return None
    diff = item_value(metric, mine) - item_value(metric, other)
    return f"{diff:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]"
