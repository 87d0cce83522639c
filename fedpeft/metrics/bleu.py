"""Corpus BLEU-4 in [0, 1]: ``bleu4`` unsmoothed (what KubeEdge Ianvs reports), ``bleu4_smoothed``
with sacrebleu's default exp smoothing.

Papineni et al., "BLEU: a Method for Automatic Evaluation of Machine Translation", ACL 2002.
https://aclanthology.org/P02-1040

Ianvs's ``fedllm-peft`` example scores ``bleu4_metric`` with Hugging Face ``evaluate``'s
``bleu``: the TensorFlow NMT formula on sacrebleu's 13a tokenisation, ``max_order=4``,
``smooth=False``. With one reference per question that is sacrebleu's
``BLEU(tokenize="13a", smooth_method="none")``: n-gram matches clipped by the reference,
precision 0 (so BLEU 0) for an order without a match, brevity penalty
``exp(1 - ref_len / hyp_len)`` when the predictions are shorter. ``bleu4_smoothed`` replaces a
zero precision by ``1 / (2^k * total)`` (mteval's smoothing), which only changes a corpus with no
match at some order: small corpora of short answers.

BLEU is a corpus statistic: n-gram matches and lengths are summed over all questions before
the ratios are taken, so it is not a mean of sentence scores. Each metric therefore carries its
per-question sufficient statistics (``statistics``) and the score of their sum
(``from_statistics``); the bootstrap sums resampled rows, which recomputes corpus BLEU on each
resample exactly without re-tokenising (the mechanism of sacrebleu's own paired bootstrap). Only
sacrebleu's public API is used: ``BLEU.corpus_score`` and the static ``BLEU.compute_bleu``.

``corpus_score(hypotheses, references)`` takes the model's outputs first and a list of
reference *streams* second (one stream here). The brevity penalty punishes only hypotheses
shorter than their references, which is why the order matters.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sacrebleu.metrics import BLEU

from fedpeft.metrics import METRICS, Metric, check_pairs

ORDER = 4


def _bleu_metric(smooth_method: str) -> Metric:
    """The corpus BLEU-4 metric with ``smooth_method``, with its bootstrap statistics attached."""
    scorer = BLEU(tokenize="13a", smooth_method=smooth_method, max_ngram_order=ORDER)

    def metric(*, predictions: list[str], references: list[str]) -> float:
        check_pairs(predictions, references)
        return scorer.corpus_score(predictions, [references]).score / 100.0

    def statistics(*, predictions: list[str], references: list[str]) -> np.ndarray:
        """Per-question statistics ``(questions, 2 + 2 * 4)``: lengths, n-gram matches, n-gram totals."""
        check_pairs(predictions, references)
        scores = [scorer.corpus_score([p], [[r]]) for p, r in zip(predictions, references)]
        return np.array([[s.sys_len, s.ref_len, *s.counts, *s.totals] for s in scores], dtype=np.int64)

    def from_statistics(totals: np.ndarray) -> float:
        """Corpus BLEU-4 in [0, 1] from statistics summed over questions (see ``statistics``)."""
        sys_len, ref_len, *rest = (int(x) for x in totals)
        return BLEU.compute_bleu(rest[:ORDER], rest[ORDER:], sys_len, ref_len, smooth_method=smooth_method,
                                 max_ngram_order=ORDER).score / 100.0

    metric.statistics = statistics  # type: ignore[attr-defined]
    metric.from_statistics = from_statistics  # type: ignore[attr-defined]
    return metric


bleu4: Callable[..., float] = METRICS.register("bleu4")(_bleu_metric("none"))
bleu4.__doc__ = "Corpus BLEU-4 of ``predictions`` against one reference each, in [0, 1], unsmoothed (Ianvs's)."
bleu4_smoothed: Callable[..., float] = METRICS.register("bleu4_smoothed")(_bleu_metric("exp"))
bleu4_smoothed.__doc__ = "Corpus BLEU-4 in [0, 1] with sacrebleu's default exp smoothing."
