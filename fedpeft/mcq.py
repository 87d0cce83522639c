"""Multiple-choice accuracy by the length-normalised log-likelihood of each option; no generation.

For an item, each option is scored as the answer to its question: the prompt is the question's
chat-template prompt (:func:`fedpeft.data.prompts.prompt_ids`, as in training and generation)
and the option's tokens follow it as the answer, tokenized as training tokenizes answers (no
EOS: an option is scored as it starts an answer, not as a whole one). Its score is the mean
log-probability of its tokens,

    score(option) = (1 / n) * sum_t log p(option_t | prompt, option_<t),    n = option tokens,

and the chosen option is the one with the highest score (the first on a tie). Without the
``1 / n`` a long right answer loses to a short wrong one, since every token costs probability.

All options of an item go through the model in one right-padded forward pass (several items
when ``batch_size`` allows). Right padding puts every real token at the position it has in an
unpadded forward (``arange`` equals ``cumsum(attention_mask) - 1`` on real tokens), so no
``position_ids`` are passed: prompt-learning PeftModels would ignore them anyway. The output
head runs at option tokens only, in chunks (:func:`fedpeft.losses.answer_nll`, as the held-out
loss). Items go through sorted by length, so a pass pads little. With ``eval.mcq_option_tokens``
only each option's first tokens are scored: long free-text options then cost little. LoRA, IA3 and the other layer adapters, P-Tuning and prompt tuning (virtual tokens prepended)
and prefix tuning (a KV-cache prefix) go through ``PeftModel.forward`` as in the held-out loss of
:mod:`fedpeft.evaluation`; other prompt-learning types are refused.

The item format and its readers live in :mod:`fedpeft.data.mcq_io` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from peft import PeftModel, PeftType
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from fedpeft.constants import KEY_MCQ_ACCURACY
from fedpeft.data.mcq_io import FORMATS, McqItem, load_mcq
from fedpeft.data.prompts import prompt_ids
from fedpeft.errors import ModelError
from fedpeft.generation import Model, eval_mode, model_device
from fedpeft.losses import answer_nll
from fedpeft.data.prompts import IGNORE_INDEX

_PROMPT_TYPES = (PeftType.P_TUNING, PeftType.PROMPT_TUNING, PeftType.PREFIX_TUNING)

Encoded = tuple[list[int], list[list[int]]]  # (prompt ids, each option's ids)


def option_scores(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[McqItem],
    *,
    system_prompt: str | None = None,
    batch_size: int = 8,
    max_seq_len: int | None = None,
    max_option_tokens: int | None = None,
    progress: bool = True,
) -> list[list[float]]:
    """The length-normalised log-likelihood of every option of every item (see the module docstring).

    Args:
        model: A base model or a PeftModel (layer adapters, P-Tuning, prompt or prefix tuning).
        tokenizer: Its tokenizer (the chat template builds the prompts).
        items: The items.
        system_prompt: The system message used in training, if any.
        batch_size: Sequences (options) per forward pass; an item's options are never split, so a
            pass holds at least one whole item.
        max_seq_len: Cut each prompt + option to this many tokens as training cuts examples
            (a prompt longer than half of it loses its start; options lose their end); None: no cut.
        max_option_tokens: Score only the first this many tokens of each option (``eval.mcq_option_tokens``):
            long free-text options (MedQuAD answers) cost a forward pass each, and their start
            says what they are about; None: whole options.
        progress: Show a tqdm bar over items.

    Returns:
        ``scores[i][k]``: mean log-probability (nats per token) of option ``k`` of item ``i``.

    Raises:
        ModelError: for a prompt-learning adapter other than P-Tuning, prompt or prefix tuning.
        ValueError: if ``batch_size`` is below 1 or an option has no token.
    """
    _check_supported(model)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoded = [_encode(tokenizer, item, system_prompt, max_seq_len, max_option_tokens) for item in items]
    order = sorted(range(len(items)), key=lambda i: _width(encoded[i]))  # similar lengths pad little
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked: any id
    scores: list[list[float]] = [[] for _ in items]
    with eval_mode(model), torch.no_grad(), tqdm(total=len(items), desc="scoring options", unit="item",
                                                  disable=not progress) as bar:
        for batch in _batches(order, [len(e[1]) for e in encoded], batch_size):
            flat = _score_rows(model, [encoded[i] for i in batch], pad_token_id)
            for i in batch:
                scores[i], flat = flat[:len(items[i].options)], flat[len(items[i].options):]
            bar.update(len(batch))
    return scores


def mcq_scores(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[McqItem],
    *,
    system_prompt: str | None = None,
    batch_size: int = 8,
    max_seq_len: int | None = None,
    max_option_tokens: int | None = None,
    progress: bool = True,
) -> list[int]:
    """The chosen option of each item: the highest length-normalised log-likelihood.

    Takes the arguments of :func:`option_scores` (and raises its errors).

    Returns:
        One option index per item, in item order (the first of equal scores).
    """
    scores = option_scores(model, tokenizer, items, system_prompt=system_prompt, batch_size=batch_size,
                           max_seq_len=max_seq_len, max_option_tokens=max_option_tokens, progress=progress)
    return [int(np.argmax(s)) for s in scores]


def mcq_correct(chosen: Sequence[int], items: Sequence[McqItem]) -> list[bool]:
    """Whether each chosen option is the item's answer (per item, for bootstrap intervals).

    Raises:
        ValueError: if there is not one choice per item, or no item.
    """
    if len(chosen) != len(items) or not items:
        raise ValueError(f"need one chosen option per item and at least one item; got {len(chosen)} "
                         f"choices for {len(items)} items")
    return [int(c) == item.answer for c, item in zip(chosen, items)]


def mcq_accuracy(chosen: Sequence[int], items: Sequence[McqItem]) -> float:
    """The fraction of items whose chosen option is the answer (see :func:`mcq_correct`)."""
    return float(np.mean(mcq_correct(chosen, items)))


def mcq_accuracy_ci(correct: Sequence[bool], *, n_resamples: int = 1000, seed: int = 0,
                    confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the accuracy, resampling items (as :func:`fedpeft.metrics.bootstrap_ci`).

    Args:
        correct: Per-item correctness from :func:`mcq_correct`.
        n_resamples: Resamples drawn (with replacement, as many items as given).
        seed: Seed of the resampling.
        confidence: Coverage of the interval, in (0, 1).

    Returns:
        ``(low, high)``.

    Raises:
        ValueError: if ``correct`` is empty or ``confidence`` is not in (0, 1).
    """
    from fedpeft.metrics import _percentile_ci  # the resampling every interval of fedpeft shares

    if not correct:
        raise ValueError("an accuracy interval needs at least one item, got none")
    values = np.asarray(correct, dtype=float)
    return _percentile_ci(lambda idx: values[idx].mean(axis=-1), len(values), n_resamples, seed, confidence)


def _check_supported(model: Model) -> None:
    if not isinstance(model, PeftModel) or getattr(model, "_adapters_disabled", False):
        return
    config = model.active_peft_config
    if config.is_prompt_learning and config.peft_type not in _PROMPT_TYPES:
        raise ModelError(f"multiple-choice scoring cannot handle PEFT type {config.peft_type.value!r}: of the "
                         f"prompt-learning types it supports {', '.join(t.value for t in _PROMPT_TYPES)} "
                         "(layer adapters such as LoRA all work)")


def _width(encoded: Encoded) -> int:
    prompt, options = encoded
    return len(prompt) + max(map(len, options))


def _encode(tokenizer: PreTrainedTokenizerBase, item: McqItem, system_prompt: str | None,
            max_seq_len: int | None, max_option_tokens: int | None = None) -> Encoded:
    """Prompt and option ids, cut as :func:`fedpeft.data.prompts.tokenize_example` cuts an example
    (and each option to its first ``max_option_tokens``)."""
    prompt = prompt_ids(tokenizer, item.question, system_prompt)
    if max_seq_len is not None and len(prompt) > max_seq_len // 2:
        prompt = prompt[-(max_seq_len // 2):]
    options = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in item.options]
    if max_seq_len is not None:
        options = [o[:max_seq_len - len(prompt)] for o in options]
    if max_option_tokens is not None:
        options = [o[:max_option_tokens] for o in options]
    for k, ids in enumerate(options):
        if not ids:
            raise ValueError(f"option {k} of {item.question[:60]!r} has no token: {item.options[k]!r}")
    return prompt, options


def _batches(order: list[int], sizes: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive items of ``order`` whose options, all together, fit ``batch_size`` (one at least)."""
    batches: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for i in order:
        if current and rows + sizes[i] > batch_size:
            batches.append(current)
            current, rows = [], 0
        current.append(i)
        rows += sizes[i]
    return batches + ([current] if current else [])


def _score_rows(model: Model, encoded: list[Encoded], pad_token_id: int) -> list[float]:
    """Mean option-token log-probability of every (item, option) row, in order, from one forward pass
    (:func:`fedpeft.losses.answer_nll`: the output head runs at option positions only)."""
    rows = [(prompt, option) for prompt, options in encoded for option in options]
    width = max(len(p) + len(o) for p, o in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (rows, seq), right-padded
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # only the option's tokens count
    for r, (prompt, option) in enumerate(rows):
        n = len(prompt) + len(option)
        ids[r, :n] = torch.tensor(prompt + option)
        mask[r, :n] = 1
        labels[r, len(prompt):n] = torch.tensor(option)
    device = model_device(model)
    sums, counts = answer_nll(model, {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                                      "labels": labels.to(device)})
    return (-sums / counts).tolist()


__all__ = [
    "FORMATS", "KEY_MCQ_ACCURACY", "McqItem", "load_mcq", "mcq_accuracy", "mcq_accuracy_ci", "mcq_correct",
    "mcq_scores", "option_scores",
]
