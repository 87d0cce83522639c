"""Text-generation metrics by name, and bootstrap confidence intervals over questions.

A metric is a callable ``metric(*, predictions, references) -> float``. Its arguments are
keyword-only on purpose: several metrics are not symmetric (BLEU's brevity penalty, ROUGE
precision and recall), and keywords make swapping what the model wrote with what it should
have written impossible at every call site.

:func:`bootstrap_ci` resamples questions and recomputes the metric on each resample
(``scipy.stats.bootstrap``, percentile method, seeded); :func:`paired_bootstrap_ci` does the same
for the difference between two runs on the same questions. Two optional attributes make that
fast without changing the result:

* a mean of per-example scores carries ``metric.per_example(*, predictions, references) ->
  list[float]`` (see :func:`mean_metric`): the resampled scores are averaged;
* a corpus statistic such as BLEU carries ``metric.statistics(*, predictions, references) ->
  array (questions, k)`` and ``metric.from_statistics(totals) -> float``: the resampled rows
  are summed and scored.

Any other metric (a plugin, say) is simply called on each resample.

Evaluation on a few dozen questions is noisy, so a difference between two runs means little
without an interval: :func:`bootstrap_ci` gives the percentile bootstrap over questions, and
:func:`paired_bootstrap_ci` the interval of a gain (fine-tuned minus zero-shot, say).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import scipy.stats

from fedpeft.metrics.plugin import plugin_metric
from fedpeft.registry import Registry


class Metric(Protocol):
    """What a registered metric is: predictions and references by keyword, one float out."""

    def __call__(self, *, predictions: list[str], references: list[str]) -> float: ...


PerExample = Callable[..., list[float]]

METRICS: Registry[Metric] = Registry("metrics", adapt=plugin_metric)
"""Metrics by name (``rouge1``, ``rouge2``, ``rougeL``, ``bleu4``, ``bleu4_smoothed``); see
:mod:`fedpeft.registry`. A plugin function is called by its parameter names, or Ianvs's way
(:mod:`fedpeft.metrics.plugin`)."""


def check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    """Raise ``ValueError`` unless there is one reference per prediction, and at least one."""
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} references; "
            "a metric needs exactly one reference per prediction"
        )
    if not predictions:
        raise ValueError("a metric needs at least one prediction/reference pair, got none")


def mean_metric(per_example: PerExample) -> Metric:
    """Build the metric that averages ``per_example``'s scores, and attach them to it.

    Args:
        per_example: ``f(*, predictions, references) -> list[float]``, one score per pair.

    Returns:
        A metric whose ``per_example`` attribute is ``per_example`` (used by :func:`bootstrap_ci`).
    """

    def metric(*, predictions: list[str], references: list[str]) -> float:
        check_pairs(predictions, references)
        return float(np.mean(per_example(predictions=predictions, references=references)))

    metric.per_example = per_example  # type: ignore[attr-defined]
    metric.__name__ = getattr(per_example, "__name__", "metric")
    metric.__doc__ = per_example.__doc__
    return metric


# The metric modules import METRICS and mean_metric from this package, so they are imported
# only once both exist.
from fedpeft.metrics import bleu, rouge  # noqa: E402,F401 - registers the built-in metrics


def compute_metrics(
    names: Sequence[str], *, predictions: list[str], references: list[str]
) -> dict[str, float]:
    """Compute every metric in ``names``.

    Args:
        names: Registered metric names, or ``path/file.py:object`` plugins.
        predictions: What the model generated, one string per question.
        references: The reference answers, in the same order.

    Returns:
        ``{name: value}`` in the order of ``names``.

    Raises:
        RegistryError: if a name is unknown (the message lists the valid names).
        ValueError: if the lists differ in length or are empty.
    """
    check_pairs(predictions, references)
    metrics = {name: METRICS.get(name) for name in names}  # fail on a bad name before any work
    return {
        name: float(metric(predictions=predictions, references=references))
        for name, metric in metrics.items()
    }


def bootstrap_ci(
    name: str,
    *,
    predictions: list[str],
    references: list[str],
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a metric, resampling questions.

    Args:
        name: A registered metric name or plugin.
        predictions: What the model generated, one string per question.
        references: The reference answers, in the same order.
        n_resamples: Number of resamples (with replacement, same size as the data).
        seed: Seed of the resampling; the same seed gives the same interval.
        confidence: Coverage of the interval, in (0, 1).

    Returns:
        ``(low, high)``.

    Raises:
        RegistryError: if ``name`` is unknown.
        ValueError: if the lists differ in length or are empty, or ``confidence`` is not in (0, 1).
    """
    check_pairs(predictions, references)
    on_resamples = _on_resamples(METRICS.get(name), predictions, references)
    return _percentile_ci(on_resamples, len(predictions), n_resamples, seed, confidence)


def paired_bootstrap_ci(
    name: str,
    *,
    predictions: list[str],
    baseline: list[str],
    references: list[str],
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Paired percentile bootstrap interval of ``metric(predictions) - metric(baseline)``.

    Both runs answered the same questions; each resample draws questions once and scores both
    runs' answers to them, so the interval is of the gain itself, not of two noisy scores.

    Args:
        name: A registered metric name or plugin.
        predictions: The run of interest's answers, one string per question.
        baseline: The other run's answers (zero-shot, say) to the same questions, same order.
        references: The reference answers, in the same order.
        n_resamples: Number of resamples (with replacement, same size as the data).
        seed: Seed of the resampling; the same seed gives the same interval.
        confidence: Coverage of the interval, in (0, 1).

    Returns:
        ``(low, high)`` of the difference; above 0 means ``predictions`` scored higher.

    Raises:
        RegistryError: if ``name`` is unknown.
        ValueError: if the lists differ in length or are empty, or ``confidence`` is not in (0, 1).
    """
    check_pairs(predictions, references)
    check_pairs(baseline, references)
    metric = METRICS.get(name)
    new, old = _on_resamples(metric, predictions, references), _on_resamples(metric, baseline, references)
    return _percentile_ci(lambda idx: new(idx) - old(idx), len(references), n_resamples, seed, confidence)


Resampled = Callable[[np.ndarray], np.ndarray]


def _percentile_ci(statistic: Resampled, n: int, n_resamples: int, seed: int,
                   confidence: float) -> tuple[float, float]:
    """``scipy.stats.bootstrap`` (percentile method) of ``statistic`` over ``n`` question indices.

    Resampling indices rather than scores is what scipy's ``paired=True`` does too: it keeps a
    question's answers together, and corpus metrics (BLEU) are not a mean of per-question scores.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n == 1:  # scipy needs two observations; the only resample of one question is itself
        value = float(statistic(np.zeros((1, 1), dtype=np.int64))[0])
        return value, value
    result = scipy.stats.bootstrap(
        (np.arange(n),), lambda idx, axis: statistic(idx), vectorized=True, n_resamples=n_resamples,
        confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _on_resamples(metric: Metric, predictions: list[str], references: list[str]) -> Resampled:
    """``f(samples) -> values``: the metric on each resample; ``samples`` is ``(resamples, questions)``
    of indices. Per-question scores or statistics are computed once, here."""
    if hasattr(metric, "per_example"):
        scores = np.asarray(metric.per_example(predictions=predictions, references=references), dtype=float)
        return lambda samples: scores[samples].mean(axis=-1)
    if hasattr(metric, "statistics") and hasattr(metric, "from_statistics"):
        rows = np.asarray(metric.statistics(predictions=predictions, references=references))
        return lambda samples: np.array([metric.from_statistics(totals) for totals in rows[samples].sum(axis=1)])
    return lambda samples: np.array([
        metric(predictions=[predictions[i] for i in idx], references=[references[i] for i in idx])
        for idx in samples
    ])


__all__ = [
    "METRICS", "Metric", "bootstrap_ci", "check_pairs", "compute_metrics", "mean_metric", "paired_bootstrap_ci",
]
