"""fedpeft.greedy: rows that end leave the batch, and every row still gets the tokens it gets alone."""

from __future__ import annotations

import copy

import pytest
import torch

from fedpeft.data.prompts import prompt_ids
from fedpeft.decoding import PreallocatedLayer, preallocated_cache, vocab_major_head
from fedpeft.errors import ModelError
from fedpeft.generation import _left_pad
from fedpeft.greedy import greedy_tokens

QUESTIONS = ["What is glaucoma?", "How is asthma treated?", "What causes anemia in older adults?",
             "Who gets gout?"]
NEW = 12


def _run(model, tokenizer, questions, eos, penalty=1.0) -> list[list[int]]:  # noqa: ANN001
    ids, mask = _left_pad([prompt_ids(tokenizer, q) for q in questions], tokenizer.pad_token_id, torch.device("cpu"))
    cache = preallocated_cache(model, ids.shape[1] + NEW)
    with torch.no_grad():
        new = greedy_tokens(model, ids, mask, cache, max_new_tokens=NEW, eos_ids=eos,
                            pad_token_id=tokenizer.pad_token_id, penalty=penalty)
    return [row[:row.index(e) + 1] if (e := next((t for t in row if t in eos), None)) is not None else row
            for row in new.tolist()]


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_rows_that_end_leave_the_batch_and_the_others_answer_as_alone(sharp, tokenizer, penalty):
    never = [len(tokenizer) - 1]  # an id these answers never reach: nothing ends
    alone = [_run(sharp, tokenizer, [q], never, penalty)[0] for q in QUESTIONS]
    # an "EOS" that one row writes early and another later or never: rows end at different steps
    eos = next([t] for t in alone[0][1:4] if any(t not in a[:4] for a in alone[1:]))
    expected = [_run(sharp, tokenizer, [q], eos, penalty)[0] for q in QUESTIONS]
    assert len({len(e) for e in expected}) > 1 and min(map(len, expected)) < NEW  # premise: ends differ
    calls = []
    hook = sharp.register_forward_hook(lambda _m, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]),
                                        with_kwargs=True)
    try:
        batched = _run(sharp, tokenizer, QUESTIONS, eos, penalty)
    finally:
        hook.remove()
    assert batched == expected
    assert calls[0] == 4 and calls[-1] < 4  # the batch shrank as rows ended
    stock = []  # and transformers' own generate, one question at a time, agrees
    for q in QUESTIONS:
        ids = torch.tensor([prompt_ids(tokenizer, q)])
        out = sharp.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                              eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, repetition_penalty=penalty)
        stock.append(out[0, ids.shape[1]:].tolist())
    assert [s[:len(e)] for s, e in zip(stock, expected)] == expected


def test_preallocated_layer_writes_in_place_and_reads_what_was_written():
    layer, chunks = PreallocatedLayer(capacity=6), [torch.randn(2, 3, n, 4) for n in (3, 1, 2)]
    pointers = set()
    for i, chunk in enumerate(chunks):
        keys, values = layer.update(chunk, -chunk)
        expected = torch.cat(chunks[:i + 1], dim=2)  # what DynamicLayer returns
        assert torch.equal(keys, expected) and torch.equal(values, -expected)
        assert layer.get_seq_length() == expected.shape[2]
        pointers.add(keys.data_ptr())
    assert len(pointers) == 1  # one buffer, never copied (DynamicLayer: a new one every update)
    with pytest.raises(ModelError, match="holds 6 positions"):
        layer.update(chunks[1], chunks[1])
    layer.keep_rows(torch.tensor([1]))  # row 0 ended: only row 1 stays, its positions as they were
    everything = torch.cat(chunks, dim=2)
    assert torch.equal(layer.keys, everything[1:]) and torch.equal(layer.values, -everything[1:])
    assert layer.get_seq_length() == 6


def test_vocab_major_head_gives_the_linear_logits_and_is_undone(sharp):
    model = copy.deepcopy(sharp)
    head = model.get_output_embeddings()
    hidden = torch.randn(4, 1, head.in_features)  # (batch, 1, hidden)
    with torch.no_grad():
        linear, linear_one = (torch.nn.functional.linear(h, head.weight) for h in (hidden, hidden[:1]))
        with vocab_major_head(model):
            assert "forward" in vars(head)  # the head is switched
            one, four = head(hidden[:1]), head(hidden)
    assert "forward" not in vars(head)
    assert torch.equal(one, linear_one)  # one row: the same bits
    torch.testing.assert_close(four, linear, atol=1e-5, rtol=1e-5)
