"""ROUGE-1, ROUGE-2 and ROUGE-L: mean F1 over questions, in [0, 1] (Google's ``rouge-score``).

Lin, "ROUGE: A Package for Automatic Evaluation of Summaries", ACL Workshop 2004.
https://aclanthology.org/W04-1013

Porter stemming is on (``use_stemmer=True``), as in most QA and summarisation papers, so
"treat"/"treatment" match. ``rouge_scorer.RougeScorer.score`` takes ``(target, prediction)``:
the reference comes first. F1 happens to be symmetric, but precision (overlap / prediction
length) and recall (overlap / reference length) are not; :func:`rouge_scores` keeps them apart.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from fedpeft.metrics import METRICS, check_pairs, mean_metric

if TYPE_CHECKING:  # rouge_score imports nltk, which imports scikit-learn and pandas where installed
    from rouge_score import rouge_scorer  # (~90 MB and ~1 s): only when a score is computed
    from rouge_score.scoring import Score


@lru_cache(maxsize=None)
def _scorer(rouge_type: str) -> rouge_scorer.RougeScorer:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([rouge_type], use_stemmer=True)


def rouge_scores(rouge_type: str, *, predictions: list[str], references: list[str]) -> list[Score]:
    """Per-question ROUGE precision, recall and F1.

    Args:
        rouge_type: ``"rouge1"``, ``"rouge2"`` or ``"rougeL"``.
        predictions: What the model generated.
        references: The reference answers, in the same order.

    Returns:
        One ``Score(precision, recall, fmeasure)`` per question.
    """
    check_pairs(predictions, references)
    scorer = _scorer(rouge_type)
    return [scorer.score(target=ref, prediction=pred)[rouge_type] for pred, ref in zip(predictions, references)]


def _f1(rouge_type: str):  # noqa: ANN202 - returns a per-example score function
    def per_example(*, predictions: list[str], references: list[str]) -> list[float]:
        scores = rouge_scores(rouge_type, predictions=predictions, references=references)
        return [s.fmeasure for s in scores]

    per_example.__name__ = rouge_type
    per_example.__doc__ = f"Mean {rouge_type} F1 over questions (stemmed), in [0, 1]."
    return per_example


rouge1 = METRICS.register("rouge1")(mean_metric(_f1("rouge1")))
rouge2 = METRICS.register("rouge2")(mean_metric(_f1("rouge2")))
rougeL = METRICS.register("rougeL")(mean_metric(_f1("rougeL")))  # noqa: N816 - the metric's usual name
