"""Evaluate a model on held-out questions: generated-answer metrics, held-out loss, and optionally
multiple-choice accuracy.

Two signals, because each misses what the other sees. Generation metrics (ROUGE, BLEU) judge
what a user would read, but greedy decoding of a few dozen answers is slow and noisy, so only
the first ``eval.max_samples`` test questions are generated. Held-out loss (token-weighted
cross-entropy on the reference answers) needs one forward pass per example, so it uses every
test example given and moves smoothly from round to round.

LoRA adapters are merged into the weights while generating (``eval.merge_lora``) and restored
bit for bit afterwards (see :func:`fedpeft.generation.merged_lora`); the loss is computed on
the unmerged model, exactly as in training.

With ``eval.mcq`` set, ``mcq_accuracy`` is added: the share of multiple-choice items whose right
option has the highest length-normalised log-likelihood (:mod:`fedpeft.mcq`), on the unmerged
model too; the items are read once per file, not every round.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from transformers import PreTrainedTokenizerBase

from fedpeft.config import EvalConfig
from fedpeft.constants import KEY_EVAL_SECONDS, KEY_GEN_TOKENS, KEY_GEN_TOKENS_PER_S, KEY_HELDOUT_LOSS, KEY_PEAK_MEMORY
from fedpeft.data.prompts import TokenizedExample, collate, tokenize_examples
from fedpeft.generation import (
    Model,
    eval_mode,
    is_lora,
    merged_lora,
    model_device,
    run_generation,
)
from fedpeft.losses import answer_nll
from fedpeft.memory import peak_memory_bytes
from fedpeft.mcq import KEY_MCQ_ACCURACY, load_mcq, mcq_accuracy, mcq_scores
from fedpeft.metrics import compute_metrics

log = logging.getLogger(__name__)

ITEMS_HELDOUT, ITEMS_MCQ = "heldout", "mcq"  # the keys of evaluate()'s per-item ``details``


def answer_losses(
    model: Model, tokenized: list[TokenizedExample], batch_size: int = 8, *, pad_token_id: int
) -> tuple[list[float], list[int]]:
    """Each example's summed answer-token cross-entropy (nats) and its answer-token count.

    Examples go through the model sorted by length (similar lengths pad little); the lists
    come back in the order of ``tokenized``.

    Args:
        model: A base model or PeftModel (prompt-learning virtual tokens are handled).
        tokenized: Examples from :func:`fedpeft.data.prompts.tokenize_examples`.
        batch_size: Examples per forward pass.
        pad_token_id: Id used for padding (any id works: padding is masked and unlabelled).
    """
    sums, counts = [0.0] * len(tokenized), [0] * len(tokenized)
    order = sorted(range(len(tokenized)), key=lambda i: len(tokenized[i].input_ids))
    device = model_device(model)
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate([tokenized[i] for i in idx], pad_token_id)
            s, n = answer_nll(model, {k: v.to(device) for k, v in batch.items()})  # head at answer positions only
            for i, si, ni in zip(idx, s.tolist(), n.tolist()):
                sums[i], counts[i] = float(si), int(ni)
    return sums, counts


def heldout_loss(
    model: Model, tokenized: list[TokenizedExample], batch_size: int = 8, *, pad_token_id: int
) -> float:
    """Token-weighted mean cross-entropy of the answer tokens of ``tokenized``.

    Every answer token counts once, whatever batch it falls in, so the value does not depend
    on ``batch_size`` and long answers weigh more than short ones.

    Args:
        model: A base model or PeftModel (prompt-learning virtual tokens are handled).
        tokenized: Examples from :func:`fedpeft.data.prompts.tokenize_examples`.
        batch_size: Examples per forward pass.
        pad_token_id: Id used for padding (any id works: padding is masked and unlabelled).

    Returns:
        The mean loss in nats per answer token.

    Raises:
        ValueError: if ``tokenized`` holds no answer token.
    """
    sums, counts = answer_losses(model, tokenized, batch_size, pad_token_id=pad_token_id)
    return _pooled_loss(sums, counts)


def _pooled_loss(sums: list[float], counts: list[int]) -> float:
    if sum(counts) == 0:
        raise ValueError(f"held-out loss needs answer tokens; the {len(counts)} examples have none")
    return sum(sums) / sum(counts)


def _generate(model: Model, tokenizer: PreTrainedTokenizerBase, questions: list[str], cfg: EvalConfig,
              system_prompt: str | None) -> tuple[list[str], tuple[float, int]]:
    """Greedy answers to ``questions`` (LoRA merged meanwhile, unless quantised); (tokens/s, tokens)."""
    quantized = getattr(model, "hf_quantizer", None) is not None  # merging into 4/8-bit weights is lossy: never
    merge = merged_lora(model) if cfg.merge_lora and is_lora(model) and not quantized else contextlib.nullcontext()
    with merge:
        result = run_generation(
            model, tokenizer, questions, system_prompt=system_prompt, max_new_tokens=cfg.max_new_tokens,
            repetition_penalty=cfg.repetition_penalty, batch_size=cfg.batch_size,
            stop_at_blank_line=cfg.stop_at_blank_line,
        )
    return result.answers, (result.num_tokens / max(result.seconds, 1e-9), int(result.num_tokens))


def evaluate(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[dict],
    cfg: EvalConfig,
    *,
    system_prompt: str | None = None,
    max_seq_len: int = 384,
    details: dict | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Generate answers to the first ``cfg.max_samples`` questions, score them, and the loss.

    Args:
        model: A base model or PeftModel.
        tokenizer: Its tokenizer.
        examples: Test examples, dicts with ``question`` and ``answer``.
        cfg: The ``eval`` section of the job config.
        system_prompt: The system message used in training, if any.
        max_seq_len: Truncation length for the held-out loss (as in training).
        details: If given, filled with per-item scores for confidence intervals:
            ``details["heldout"]``, one ``{"question", "nll", "tokens"}`` per example (summed
            nats and answer tokens: the pooled loss is sum(nll) / sum(tokens)), and
            ``details["mcq"]``, one ``{"question", "chosen", "answer"}`` per item.

    Returns:
        ``(metrics, predictions)``: ``metrics`` holds each of ``cfg.metrics``,
        ``heldout_loss`` (if ``cfg.heldout_loss``; over all ``examples``), ``mcq_accuracy``
        (if ``cfg.mcq``; over its first ``cfg.mcq_max_items`` items) and ``gen_tokens_per_s``;
        ``predictions`` holds one ``{"question", "reference", "prediction"}`` row per generated
        question.

    Raises:
        RegistryError: if a metric name is unknown.
        DataError: if ``cfg.mcq`` is unreadable.
        ValueError: if ``examples`` is empty.
    """
    if not examples:
        raise ValueError("evaluate needs at least one test example, got none")
    start = time.perf_counter()
    sample = examples[: cfg.max_samples]
    questions = [e["question"] for e in sample]
    references = [e["answer"] for e in sample]
    metrics, answers, generated = {}, [], None
    if sample:  # max_samples 0 (a site's held-out loss only): nothing to generate
        answers, generated = _generate(model, tokenizer, questions, cfg, system_prompt)
        metrics = compute_metrics(cfg.metrics, predictions=answers, references=references)
    if cfg.heldout_loss:
        tokenized = tokenize_examples(tokenizer, examples, max_seq_len, system_prompt)
        sums, counts = answer_losses(model, tokenized, cfg.batch_size, pad_token_id=tokenizer.pad_token_id)
        metrics[KEY_HELDOUT_LOSS] = _pooled_loss(sums, counts)
        if details is not None:
            details[ITEMS_HELDOUT] = [{"question": e["question"], "nll": s, "tokens": n}
                                      for e, s, n in zip(examples, sums, counts)]
    if cfg.mcq:
        items = load_mcq(cfg.mcq, cfg.mcq_max_items)  # parsed once per file version (cached)
        chosen = mcq_scores(model, tokenizer, items, system_prompt=system_prompt, batch_size=cfg.batch_size,
                            max_seq_len=max_seq_len, max_option_tokens=cfg.mcq_option_tokens)
        metrics[KEY_MCQ_ACCURACY] = mcq_accuracy(chosen, items)
        if details is not None:
            details[ITEMS_MCQ] = [{"question": it.question, "chosen": c, "answer": it.answer}
                                  for it, c in zip(items, chosen)]
    if generated is not None:
        metrics[KEY_GEN_TOKENS_PER_S], metrics[KEY_GEN_TOKENS] = generated
    metrics[KEY_EVAL_SECONDS] = round(time.perf_counter() - start, 3)
    metrics[KEY_PEAK_MEMORY] = peak_memory_bytes(model_device(model))
    log.info("evaluated %d questions: %s", len(sample), ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    rows = [{"question": q, "reference": r, "prediction": p} for q, r, p in zip(questions, references, answers)]
    return metrics, rows
