"""Hugging Face ``evaluate``'s ``bleu`` metric, re-typed as the tests' reference for BLEU-4.

``evaluate.load("bleu").compute(predictions, references)`` (what KubeEdge Ianvs's
``bleu4_metric`` calls) is TensorFlow NMT's ``compute_bleu`` over sacrebleu's 13a tokens with
``max_order=4, smooth=False``; ``smooth=True`` is Lin and Och's add-one on every order. Written
from the formula (huggingface/evaluate ``metrics/bleu``), independently of fedpeft's BLEU.
"""

from __future__ import annotations

import collections
import math

from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a


def _ngrams(tokens: list[str], max_order: int) -> collections.Counter:
    return collections.Counter(tuple(tokens[i:i + n]) for n in range(1, max_order + 1)
                               for i in range(len(tokens) - n + 1))


def hf_bleu(predictions: list[str], references: list[str], max_order: int = 4, smooth: bool = False) -> float:
    """Corpus BLEU of ``predictions`` against one reference each, as ``evaluate``'s ``bleu`` computes it."""
    tokenize = Tokenizer13a()
    matches, possible, hyp_len, ref_len = [0] * max_order, [0] * max_order, 0, 0
    for pred, ref in zip(predictions, references):
        p, r = tokenize(pred).split(), tokenize(ref).split()
        hyp_len, ref_len = hyp_len + len(p), ref_len + len(r)
        for ngram, count in (_ngrams(p, max_order) & _ngrams(r, max_order)).items():
            matches[len(ngram) - 1] += count
        for n in range(1, max_order + 1):
            possible[n - 1] += max(0, len(p) - n + 1)
    precisions = [(m + 1) / (c + 1) if smooth else (m / c if c else 0.0) for m, c in zip(matches, possible)]
    geo_mean = math.exp(sum(math.log(x) for x in precisions) / max_order) if min(precisions) > 0 else 0.0
    ratio = hyp_len / ref_len  # evaluate raises ZeroDivisionError below when every prediction is empty
    return geo_mean * (1.0 if ratio > 1.0 else math.exp(1 - 1 / ratio))
