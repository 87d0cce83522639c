"""Corpus BLEU-4 in [0, 1] (``sacrebleu``, its default 13a tokenisation and exp smoothing).

Papineni et al., "BLEU: a Method for Automatic Evaluation of Machine Translation", ACL 2002.
https://aclanthology.org/P02-1040

BLEU is a corpus statistic: n-gram matches and lengths are summed over all questions before
the ratios are taken, so it is not a mean of sentence scores. ``bleu4`` therefore carries its
per-question sufficient statistics (``statistics``) and the score of their sum
(``from_statistics``); the bootstrap sums resampled rows, which recomputes corpus BLEU on each
resample exactly without re-tokenising (the mechanism of sacrebleu's own paired bootstrap).

``sacrebleu.corpus_bleu(hypotheses, references)`` takes the model's outputs first and a list
of reference *streams* second (one stream here). The brevity penalty punishes only hypotheses
shorter than their references, which is why the order matters.
"""

from __future__ import annotations

import numpy as np
import sacrebleu
from sacrebleu.metrics import BLEU

from fedpeft.metrics import METRICS, check_pairs


@METRICS.register("bleu4")
def bleu4(*, predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 of ``predictions`` against one reference each, in [0, 1]."""
    check_pairs(predictions, references)
    return sacrebleu.corpus_bleu(hypotheses=predictions, references=[references]).score / 100.0


def statistics(*, predictions: list[str], references: list[str]) -> np.ndarray:
    """Per-question BLEU statistics ``(questions, 2 + 2 * 4)``: lengths, n-gram matches, totals."""
    check_pairs(predictions, references)
    # sacrebleu's internal API (used by its own bootstrap); tests compare it with corpus_bleu.
    rows = BLEU()._extract_corpus_statistics(predictions, [references])
    return np.asarray(rows, dtype=np.int64)


def from_statistics(totals: np.ndarray) -> float:
    """Corpus BLEU-4 in [0, 1] from statistics summed over questions (see :func:`statistics`)."""
    return BLEU()._compute_score_from_stats([int(x) for x in totals]).score / 100.0


bleu4.statistics = statistics  # type: ignore[attr-defined]
bleu4.from_statistics = from_statistics  # type: ignore[attr-defined]
