"""Prompt tokenization: loss only on answer tokens, EOS learned, truncation, right-padded batches."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerBase

from fedpeft.config import ModelConfig
from fedpeft.data.prompts import IGNORE_INDEX, collate, prompt_ids, tokenize_example
from fedpeft.models import load_tokenizer

QUESTION = "What is high blood pressure?"
ANSWER = "Blood pressure that stays above normal over time."


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return load_tokenizer(ModelConfig(name="tiny-random-llama"))


def test_prompt_is_masked_and_answer_ends_with_eos(tokenizer: PreTrainedTokenizerBase) -> None:
    ex = tokenize_example(tokenizer, QUESTION, ANSWER, max_seq_len=256)
    prompt = prompt_ids(tokenizer, QUESTION)
    assert len(ex.input_ids) == len(ex.labels) > len(prompt)
    assert ex.input_ids[: len(prompt)] == prompt
    assert ex.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    answer = ex.labels[len(prompt):]
    assert answer == ex.input_ids[len(prompt):] and IGNORE_INDEX not in answer
    assert answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer[:-1]).strip() == ANSWER


def test_system_prompt_is_part_of_the_masked_prompt(tokenizer: PreTrainedTokenizerBase) -> None:
    plain = tokenize_example(tokenizer, QUESTION, ANSWER, max_seq_len=256)
    system = tokenize_example(tokenizer, QUESTION, ANSWER, max_seq_len=256, system_prompt="Be brief.")
    masked = system.labels.count(IGNORE_INDEX)
    assert "Be brief." in tokenizer.decode(system.input_ids[:masked])
    assert "Be brief." not in tokenizer.decode(plain.input_ids)
    assert system.labels[masked:] == plain.labels[plain.labels.count(IGNORE_INDEX):]


def test_long_answer_is_truncated_without_eos(tokenizer: PreTrainedTokenizerBase) -> None:
    prompt_len = len(prompt_ids(tokenizer, QUESTION))
    max_len = 2 * prompt_len + 8  # the prompt fits in half, so only the answer is cut
    ex = tokenize_example(tokenizer, QUESTION, ANSWER * 10, max_seq_len=max_len)
    assert len(ex.input_ids) == len(ex.labels) == max_len
    assert ex.input_ids[:prompt_len] == prompt_ids(tokenizer, QUESTION)
    assert ex.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert tokenizer.eos_token_id not in ex.labels[prompt_len:]  # never learn to stop mid-answer


def test_long_prompt_is_cut_from_the_left(tokenizer: PreTrainedTokenizerBase) -> None:
    question = "Tell me about blood pressure. " * 40
    ex = tokenize_example(tokenizer, question, ANSWER, max_seq_len=64)
    assert len(ex.input_ids) <= 64
    assert ex.labels.count(IGNORE_INDEX) == 32  # the prompt keeps max_seq_len // 2 tokens
    assert ex.input_ids[:32] == prompt_ids(tokenizer, question)[-32:]  # the assistant header survives
    assert ex.labels[32] != IGNORE_INDEX


def test_collate_right_pads(tokenizer: PreTrainedTokenizerBase) -> None:
    short = tokenize_example(tokenizer, "Why?", "Because.", max_seq_len=256)
    long = tokenize_example(tokenizer, QUESTION, ANSWER, max_seq_len=256)
    pad = tokenizer.pad_token_id
    batch = collate([short, long], pad_token_id=pad)
    width = len(long.input_ids)
    n = len(short.input_ids)
    assert all(t.shape == (2, width) for t in batch.values())
    assert batch["input_ids"][0, :n].tolist() == short.input_ids
    assert batch["input_ids"][0, n:].tolist() == [pad] * (width - n)
    assert batch["labels"][0, :n].tolist() == short.labels
    assert batch["labels"][0, n:].tolist() == [IGNORE_INDEX] * (width - n)
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (width - n)
    assert batch["attention_mask"][1].tolist() == [1] * width
    assert batch["labels"][1].tolist() == long.labels
