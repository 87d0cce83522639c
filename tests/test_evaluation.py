"""Evaluation: held-out loss against hand-computed references, and evaluate()'s outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PromptEncoderConfig, get_peft_model

from fedpeft.config import EvalConfig
from fedpeft.constants import (
    EVAL_MEASUREMENTS, KEY_EVAL_SECONDS, KEY_GEN_TOKENS, KEY_GEN_TOKENS_PER_S, KEY_HELDOUT_LOSS, KEY_PEAK_MEMORY,
)
from fedpeft.data.prompts import tokenize_examples
from fedpeft.evaluation import ITEMS_HELDOUT, answer_losses, evaluate, heldout_loss

EXAMPLES = [
    {"question": "What is high blood pressure?", "answer": "Blood pressure that stays above normal."},
    {"question": "How is the flu treated?", "answer": "Rest, fluids and sometimes antiviral drugs."},
    {"question": "Who gets gout?", "answer": "Mostly men, and people who eat a lot of meat or drink beer."},
    {"question": "What is diabetes?", "answer": "High blood sugar."},
    {"question": "Can asthma be cured?", "answer": "No, but it can be controlled with inhalers."},
]


def _perturb(params: list[torch.nn.Parameter], seed: int, std: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture
def base_model(sharp):
    return copy.deepcopy(sharp)


@pytest.fixture
def lora_model(sharp):
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(copy.deepcopy(sharp), config)
    _perturb([p for n, p in model.named_parameters() if "lora_B" in n], seed=0, std=0.5)
    return model


@pytest.fixture
def ptuning_model(sharp):
    config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, encoder_hidden_size=32)
    model = get_peft_model(copy.deepcopy(sharp), config)
    _perturb(list(model.prompt_encoder.parameters()), seed=1, std=0.5)
    return model


def _reference_loss(model, tokenized) -> float:  # noqa: ANN001
    """Token-weighted mean of transformers' own per-example loss, one unpadded example at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in tokenized:
            out = model(input_ids=torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels]))
            n = sum(label != -100 for label in ex.labels[1:])
            total, count = total + float(out.loss) * n, count + n
    return total / count


@pytest.mark.parametrize("kind", ["base", "lora", "ptuning"])
def test_heldout_loss_is_the_token_weighted_mean_whatever_the_batch_size(kind, request, tokenizer):
    model = request.getfixturevalue(f"{kind}_model").eval()
    tokenized = tokenize_examples(tokenizer, EXAMPLES, max_seq_len=384)
    expected = _reference_loss(model, tokenized)
    for batch_size in (1, 2, 5):
        got = heldout_loss(model, tokenized, batch_size, pad_token_id=tokenizer.pad_token_id)
        assert got == pytest.approx(expected, rel=1e-5)


def test_per_question_losses_are_each_questions_own_loss_in_input_order(lora_model, tokenizer):
    tokenized = tokenize_examples(tokenizer, EXAMPLES, max_seq_len=384)
    sums, counts = answer_losses(lora_model.eval(), tokenized, 3, pad_token_id=tokenizer.pad_token_id)
    for ex, s, n in zip(tokenized, sums, counts):  # batches go sorted by length: the order must come back
        assert s / n == pytest.approx(_reference_loss(lora_model, [ex]), rel=1e-5)
    cfg = EvalConfig(max_samples=1, max_new_tokens=2, batch_size=3)
    details: dict = {}
    metrics, _ = evaluate(lora_model, tokenizer, EXAMPLES, cfg, details=details)
    rows = details[ITEMS_HELDOUT]
    assert [r["question"] for r in rows] == [e["question"] for e in EXAMPLES]
    assert sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows) == pytest.approx(metrics[KEY_HELDOUT_LOSS])


def test_heldout_loss_sees_the_adapters(base_model, lora_model, ptuning_model, tokenizer):
    tokenized = tokenize_examples(tokenizer, EXAMPLES, max_seq_len=384)
    losses = [heldout_loss(m, tokenized, pad_token_id=tokenizer.pad_token_id)
              for m in (base_model, lora_model, ptuning_model)]
    assert losses[1] != pytest.approx(losses[0], rel=1e-4)  # float noise is ~1e-7
    assert losses[2] != pytest.approx(losses[0], rel=1e-4)


def test_evaluate_returns_metrics_and_prediction_rows(base_model, tokenizer):
    cfg = EvalConfig(max_samples=3, max_new_tokens=6, batch_size=2, metrics=["rouge1", "bleu4"])
    metrics, rows = evaluate(base_model, tokenizer, EXAMPLES, cfg)
    assert list(metrics) == ["rouge1", "bleu4", KEY_HELDOUT_LOSS, *EVAL_MEASUREMENTS]
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("rouge1", "bleu4"))
    assert metrics[KEY_GEN_TOKENS_PER_S] > 0 and metrics[KEY_EVAL_SECONDS] > 0
    assert 0 < metrics[KEY_GEN_TOKENS] <= 3 * 6 and metrics[KEY_PEAK_MEMORY] > 100e6  # 3 answers of <= 6 tokens
    tokenized = tokenize_examples(tokenizer, EXAMPLES, max_seq_len=384)  # the loss uses every example
    assert metrics[KEY_HELDOUT_LOSS] == pytest.approx(_reference_loss(base_model, tokenized), rel=1e-5)
    assert [set(r) for r in rows] == [{"question", "reference", "prediction"}] * 3
    assert [r["question"] for r in rows] == [e["question"] for e in EXAMPLES[:3]]
    assert [r["reference"] for r in rows] == [e["answer"] for e in EXAMPLES[:3]]
    assert all(isinstance(r["prediction"], str) for r in rows)


def test_evaluate_without_heldout_loss_or_sample_cap(tiny_model, tokenizer):
    cfg = EvalConfig(max_samples=None, max_new_tokens=4, metrics=["rougeL"], heldout_loss=False)
    metrics, rows = evaluate(tiny_model, tokenizer, EXAMPLES, cfg)
    assert set(metrics) == {"rougeL", *EVAL_MEASUREMENTS}
    assert len(rows) == len(EXAMPLES)


def test_evaluate_with_no_question_to_generate_scores_the_loss_only(tiny_model, tokenizer):
    cfg = EvalConfig(max_new_tokens=4, metrics=["rougeL"]).model_copy(update={"max_samples": 0})  # a site's slice
    metrics, rows = evaluate(tiny_model, tokenizer, EXAMPLES, cfg)
    assert set(metrics) == {KEY_HELDOUT_LOSS, KEY_EVAL_SECONDS, KEY_PEAK_MEMORY} and rows == []


def test_evaluate_merges_lora_only_while_generating(lora_model, tokenizer):
    before = {n: p.detach().clone() for n, p in lora_model.named_parameters()}
    cfg = EvalConfig(max_samples=4, max_new_tokens=6, batch_size=2)
    merged_metrics, merged_rows = evaluate(lora_model, tokenizer, EXAMPLES, cfg)
    assert all(torch.equal(p, before[n]) for n, p in lora_model.named_parameters())
    assert not any(getattr(m, "merged", False) for m in lora_model.modules())
    metrics, rows = evaluate(lora_model, tokenizer, EXAMPLES, cfg.model_copy(update={"merge_lora": False}))
    assert [r["prediction"] for r in merged_rows] == [r["prediction"] for r in rows]
    assert merged_metrics[KEY_HELDOUT_LOSS] == metrics[KEY_HELDOUT_LOSS]


def test_evaluate_rejects_no_examples(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="at least one"):
        evaluate(tiny_model, tokenizer, [], EvalConfig())


def test_eval_stop_at_blank_line_reaches_generation(tiny_model, tokenizer, monkeypatch):
    import fedpeft.evaluation as evaluation

    seen = {}
    real = evaluation.run_generation

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "run_generation", spy)
    cfg = EvalConfig(max_samples=1, max_new_tokens=4, metrics=["rougeL"], heldout_loss=False, stop_at_blank_line=True)
    evaluate(tiny_model, tokenizer, EXAMPLES, cfg)
    assert seen["stop_at_blank_line"] is True
