"""Confidence intervals from per-item scores: held-out loss per question and multiple-choice choices.

An evaluation's per-item scores (``details`` of :func:`fedpeft.evaluation.evaluate`, saved by a run
as ``item_scores.json``) let the two scores that are not means of per-answer metrics get intervals
like ROUGE: the held-out loss is pooled, ``sum(nll) / sum(tokens)`` over the questions drawn, and
multiple-choice accuracy is the share of items drawn whose chosen option is the answer. A paired
interval draws questions once per resample and scores both evaluations on them.
"""

from __future__ import annotations

import numpy as np

from fedpeft.constants import KEY_HELDOUT_LOSS, KEY_MCQ_ACCURACY
from fedpeft.metrics import _percentile_ci

ITEM_KEYS = {KEY_HELDOUT_LOSS: "heldout", KEY_MCQ_ACCURACY: "mcq"}  # metric -> its list in the per-item scores
ITEM_METRICS = tuple(ITEM_KEYS)


def _statistic(metric: str, rows: list[dict]):
    """``f(idx) -> value per resample`` of ``metric`` over the items ``idx`` (any leading shape)."""
    if metric == KEY_HELDOUT_LOSS:
        nll = np.array([r["nll"] for r in rows], dtype=np.float64)
        tokens = np.array([r["tokens"] for r in rows], dtype=np.float64)
        return lambda idx: nll[idx].sum(axis=-1) / tokens[idx].sum(axis=-1)
    right = np.array([r["chosen"] == r["answer"] for r in rows], dtype=np.float64)
    return lambda idx: right[idx].mean(axis=-1)


def _rows(metric: str, items: dict | None) -> list[dict] | None:
    return (items or {}).get(ITEM_KEYS[metric]) or None


def item_value(metric: str, items: dict) -> float:
    """``metric`` over all of one evaluation's items (the value the evaluation recorded)."""
    rows = _rows(metric, items)
    return float(_statistic(metric, rows)(np.arange(len(rows))))


def item_ci(metric: str, items: dict | None, *, n_resamples: int = 1000, seed: int = 0,
            confidence: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``metric`` (``heldout_loss`` or ``mcq_accuracy``) from one
    evaluation's per-item scores; None if it has none."""
    rows = _rows(metric, items)
    if rows is None:
        return None
    return _percentile_ci(_statistic(metric, rows), len(rows), n_resamples, seed, confidence)


def paired_item_ci(metric: str, mine: dict | None, base: dict | None, *, n_resamples: int = 1000, seed: int = 0,
                   confidence: float = 0.95) -> tuple[float, float] | None:
    """Paired percentile bootstrap interval of ``metric(mine) - metric(base)`` over the items both
    scored; None unless both have per-item scores for the same questions in the same order."""
    a, b = _rows(metric, mine), _rows(metric, base)
    if a is None or b is None or [r["question"] for r in a] != [r["question"] for r in b]:
        return None
    new, old = _statistic(metric, a), _statistic(metric, b)
    return _percentile_ci(lambda idx: new(idx) - old(idx), len(a), n_resamples, seed, confidence)
