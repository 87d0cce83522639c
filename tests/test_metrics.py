"""Metrics: hand-checked values, argument order, plugins, unknown names, bootstrap intervals."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest
import sacrebleu

from fedpeft.errors import RegistryError
from fedpeft.metrics import METRICS, bootstrap_ci, compute_metrics, paired_bootstrap_ci
from fedpeft.metrics.rouge import rouge_scores
from hf_bleu import hf_bleu

BUILTIN = ["rouge1", "rouge2", "rougeL", "bleu4", "bleu4_smoothed"]
# A short prediction whose words are a prefix of the longer reference.
SHORT = "the patient should drink"
LONG = "the patient should drink more water every day"


def test_identical_text_scores_one():
    texts = ["Drink plenty of water and rest.", "High blood pressure often has no symptoms at all."]
    scores = compute_metrics(BUILTIN, predictions=texts, references=texts)
    assert scores == pytest.approx({name: 1.0 for name in BUILTIN})


def test_rouge_f1_matches_hand_value_and_keeps_prediction_and_reference_apart():
    # 4 prediction words, 8 reference words, 4 shared unigrams, 3 shared bigrams.
    uni = rouge_scores("rouge1", predictions=[SHORT], references=[LONG])[0]
    assert (uni.precision, uni.recall) == pytest.approx((4 / 4, 4 / 8))  # swapped: (0.5, 1.0)
    bi = rouge_scores("rouge2", predictions=[SHORT], references=[LONG])[0]
    assert (bi.precision, bi.recall) == pytest.approx((3 / 3, 3 / 7))
    scores = compute_metrics(["rouge1", "rouge2", "rougeL"], predictions=[SHORT], references=[LONG])
    assert scores["rouge1"] == pytest.approx(2 * 1 * 0.5 / 1.5)  # 2/3
    assert scores["rouge2"] == pytest.approx(2 * 1 * (3 / 7) / (1 + 3 / 7))  # 0.6
    assert scores["rougeL"] == pytest.approx(2 / 3)  # LCS = 4 words


def test_rouge_stems_and_averages_over_examples():
    same_stem = compute_metrics(["rouge1"], predictions=["treatments"], references=["treatment"])["rouge1"]
    assert same_stem == pytest.approx(1.0)
    mean = compute_metrics(["rouge1"], predictions=[SHORT, "unrelated"], references=[LONG, LONG])["rouge1"]
    assert mean == pytest.approx((2 / 3 + 0.0) / 2)


def test_bleu_brevity_penalty_applies_to_the_shorter_prediction():
    # Every n-gram of the prediction is in the reference: precisions are 1, BLEU is the brevity
    # penalty exp(1 - ref_len / hyp_len) = exp(1 - 8/4).
    assert compute_metrics(["bleu4"], predictions=[SHORT], references=[LONG])["bleu4"] == pytest.approx(math.exp(-1))
    swapped = compute_metrics(["bleu4"], predictions=[LONG], references=[SHORT])["bleu4"]
    assert swapped == pytest.approx((4 / 8 * 3 / 7 * 2 / 6 * 1 / 5) ** 0.25)  # no penalty, lower precisions


# No 4-gram of the first prediction is in its reference; the second matches exactly.
NO_4GRAM = ("drink more water daily", "drink more water every day")
EXACT = ("stay in bed all day", "stay in bed all day")


def test_bleu4_is_unsmoothed_corpus_bleu_as_ianvs_reports_it_and_smoothing_changes_only_bleu4_smoothed():
    # Alone, NO_4GRAM has precisions 3/4, 2/3, 1/2, 0/1 and brevity penalty exp(1 - 5/4): BLEU 0;
    # exp smoothing counts the 4-gram precision as 1 / (2 * 1).
    one = {"predictions": [NO_4GRAM[0]], "references": [NO_4GRAM[1]]}
    assert METRICS.get("bleu4")(**one) == 0.0 == hf_bleu(one["predictions"], one["references"])
    smoothed = math.exp(1 - 5 / 4) * (3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25
    assert METRICS.get("bleu4_smoothed")(**one) == pytest.approx(smoothed, abs=1e-9)
    # Corpus BLEU sums before dividing: 8/9, 6/7, 4/5, 2/3, brevity penalty exp(1 - 10/9)
    # (a mean of sentence BLEUs would be (0 + 1) / 2).
    both = {"predictions": [NO_4GRAM[0], EXACT[0]], "references": [NO_4GRAM[1], EXACT[1]]}
    corpus = math.exp(1 - 10 / 9) * (8 / 9 * 6 / 7 * 4 / 5 * 2 / 3) ** 0.25
    assert METRICS.get("bleu4")(**both) == pytest.approx(corpus, abs=1e-9)
    assert hf_bleu(both["predictions"], both["references"]) == pytest.approx(corpus, abs=1e-9)
    assert abs(hf_bleu(both["predictions"], both["references"], smooth=True) - corpus) > 1e-3  # add-one differs


def test_bleu4_equals_evaluate_bleu_on_tokenised_text():
    predictions, references = _corpus()
    predictions += ["Drink 2 litres of water, daily!", "BP < 120/80 mm Hg is normal (usually)."]
    references += ["Drink 2 litres of water daily.", "A BP < 120/80 mm Hg is normal."]
    got = compute_metrics(["bleu4"], predictions=predictions, references=references)["bleu4"]
    assert got > 0.1 and got == pytest.approx(hf_bleu(predictions, references), abs=1e-9)


def test_metric_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        METRICS.get("bleu4")([SHORT], [LONG])  # type: ignore[misc]


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_metrics(["rouge1"], predictions=["a", "b"], references=["a"])


def test_plugin_metric_from_a_file(tmp_path):
    plugin = tmp_path / "exact_match.py"
    plugin.write_text(textwrap.dedent('''
        def exact_match(*, predictions, references):
            return sum(p == r for p, r in zip(predictions, references)) / len(predictions)
    '''))
    scores = compute_metrics([f"{plugin}:exact_match", "rouge1"], predictions=["a b", "c"], references=["a b", "d"])
    assert scores[f"{plugin}:exact_match"] == pytest.approx(0.5)
    low, high = bootstrap_ci(f"{plugin}:exact_match", predictions=["a", "b", "c"], references=["a", "x", "c"],
                             n_resamples=200)
    assert 0.0 <= low <= 2 / 3 <= high <= 1.0


def test_unknown_metric_lists_the_valid_names():
    with pytest.raises(RegistryError) as err:
        compute_metrics(["rouge-l"], predictions=["a"], references=["a"])
    message = str(err.value)
    assert "rouge-l" in message and all(name.lower() in message for name in BUILTIN)


def _corpus() -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(0)
    words = "the patient should drink more water".split()  # few words: some 4-grams match (BLEU > 0)
    predictions = [" ".join(rng.choice(words, 12)) for _ in range(30)]
    references = [" ".join(rng.choice(words, 16)) for _ in range(30)]
    return predictions, references


@pytest.mark.parametrize("name", BUILTIN)
def test_bootstrap_interval_contains_the_estimate_and_is_reproducible(name):
    predictions, references = _corpus()
    point = compute_metrics([name], predictions=predictions, references=references)[name]
    low, high = bootstrap_ci(name, predictions=predictions, references=references, seed=3)
    assert low < point < high
    assert (low, high) == bootstrap_ci(name, predictions=predictions, references=references, seed=3)
    assert (low, high) != bootstrap_ci(name, predictions=predictions, references=references, seed=4)
    narrow = bootstrap_ci(name, predictions=predictions, references=references, seed=3, confidence=0.5)
    assert low <= narrow[0] <= narrow[1] <= high


@pytest.mark.parametrize(("name", "smooth"), [("bleu4", "none"), ("bleu4_smoothed", "exp")])
def test_bleu_bootstrap_recomputes_corpus_bleu_on_each_resample(name, smooth):
    """The fast path (summed sufficient statistics) equals calling sacrebleu on each resample."""
    predictions, references = _corpus()
    n, seed = 50, 7
    samples = np.random.default_rng(seed).integers(0, len(predictions), size=(n, len(predictions)))
    values = [
        sacrebleu.corpus_bleu([predictions[i] for i in idx], [[references[i] for i in idx]],
                              smooth_method=smooth).score / 100
        for idx in samples
    ]
    expected = tuple(np.quantile(values, [0.025, 0.975]))
    got = bootstrap_ci(name, predictions=predictions, references=references, n_resamples=n, seed=seed)
    assert got == pytest.approx(expected, abs=1e-12)


def test_paired_interval_of_a_constant_gain_has_zero_width_at_that_gain():
    # Every question: ROUGE-1 2/3 (SHORT against LONG, hand value above) against 0 for the baseline.
    references = [LONG] * 12
    low, high = paired_bootstrap_ci("rouge1", predictions=[SHORT] * 12, baseline=["unrelated"] * 12,
                                    references=references)
    assert (low, high) == pytest.approx((2 / 3, 2 / 3))
    one = paired_bootstrap_ci("rouge1", predictions=[SHORT], baseline=["unrelated"], references=[LONG])
    assert one == pytest.approx((2 / 3, 2 / 3))  # one question: its own gain
    predictions, references = _corpus()  # a corpus statistic (BLEU) compared with itself gains nothing
    assert paired_bootstrap_ci("bleu4", predictions=predictions, baseline=predictions,
                               references=references) == pytest.approx((0.0, 0.0))


def test_paired_interval_of_a_clear_gain_lies_above_zero_and_swapping_the_runs_negates_it():
    references = [f"answer number {i}" for i in range(20)]
    better = references[:16] + ["no"] * 4  # right on 16 of 20 questions
    worse = references[:2] + ["no"] * 18  # right on 2 of 20
    low, high = paired_bootstrap_ci("rougeL", predictions=better, baseline=worse, references=references, seed=1)
    assert 0.0 < low < 14 / 20 < high <= 1.0
    swapped = paired_bootstrap_ci("rougeL", predictions=worse, baseline=better, references=references, seed=1)
    assert swapped == pytest.approx((-high, -low))


def test_paired_interval_needs_one_baseline_answer_per_question():
    with pytest.raises(ValueError, match="2 predictions but 3 references"):
        paired_bootstrap_ci("rouge1", predictions=["a", "b", "c"], baseline=["a", "b"], references=["a", "b", "c"])


def test_item_intervals_pool_the_loss_and_pair_the_questions():
    from fedpeft.metrics.items import item_ci, paired_item_ci

    base = {"heldout": [{"question": q, "nll": 2.0 * n, "tokens": n} for q, n in (("a", 1), ("b", 3), ("c", 4))],
            "mcq": [{"question": q, "chosen": 0, "answer": a} for q, a in (("a", 0), ("b", 1), ("c", 1), ("d", 0))]}
    assert item_ci("heldout_loss", base) == (2.0, 2.0)  # every question at 2 nats/token: every resample too
    low, high = item_ci("mcq_accuracy", base)
    assert 0.0 <= low < 0.5 < high <= 1.0
    better = {"heldout": [{**r, "nll": r["nll"] - r["tokens"]} for r in base["heldout"]],  # 1 nat/token less each
              "mcq": [{**r, "chosen": r["answer"]} for r in base["mcq"]]}
    assert paired_item_ci("heldout_loss", better, base) == pytest.approx((-1.0, -1.0))  # paired: no spread at all
    low, high = paired_item_ci("mcq_accuracy", better, base)
    assert 0.0 <= low <= 0.5 <= high <= 1.0  # 2 of 4 items gained
    other = {"heldout": [{**r, "question": r["question"] + "?"} for r in base["heldout"]]}
    assert paired_item_ci("heldout_loss", other, base) is None and paired_item_ci("mcq_accuracy", other, base) is None
