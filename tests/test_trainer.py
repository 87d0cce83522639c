"""Local training (``fit``) on the tiny model: gradient accumulation, FedProx, bf16 autocast."""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft.adapters import get_trainable_state
from fedpeft.config import TrainConfig
from fedpeft.data.prompts import IGNORE_INDEX, tokenize_examples
from fedpeft.peft_methods import build_peft_method, wrap_model
from fedpeft.state import State
from fedpeft.trainer import fit, num_optimizer_steps

# One-digit numbers: every example has the same length and the same number of answer tokens, so
# a batch's token-weighted loss is exactly the mean of its halves' losses, and nothing is padded.
ROWS = [{"question": f"What is condition {i}?", "answer": f"Condition {i} is a made-up illness number {i}."}
        for i in range(10)]


@pytest.fixture
def lora(tiny_model):
    """The tiny Llama with a LoRA adapter and no dropout (two runs see the same forward)."""
    torch.manual_seed(0)
    return wrap_model(tiny_model, build_peft_method("lora", {"r": 4, "dropout": 0.0}))


@pytest.fixture(scope="module")
def examples(tokenizer):
    tokenized = tokenize_examples(tokenizer, ROWS, max_seq_len=64)
    assert len({len(e.input_ids) for e in tokenized}) == 1  # the premise of the accumulation test
    assert len({sum(t != IGNORE_INDEX for t in e.labels) for e in tokenized}) == 1
    return tokenized


def _fit(model, examples, tokenizer, start: State, **train) -> State:  # noqa: ANN001
    """The adapter after ``fit`` from ``start`` (fit loads ``start`` itself, so calls are independent)."""
    cfg = TrainConfig(**{"learning_rate": 1e-2, "max_grad_norm": None, **train})
    return fit(model, examples, cfg, start, seed=0, pad_token_id=tokenizer.pad_token_id, progress=False).state


def _distance(a: State, b: State) -> float:
    return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))


def test_each_step_averages_the_micro_batches_it_saw(lora, examples, tokenizer):
    # 10 examples in micro-batches of 2 with grad_accum=2: groups of 2, 2 and a short last group
    # of 1 micro-batch. Each step must follow the mean gradient of its group, i.e. the gradient of
    # one batch of 4, 4 and 2 examples (the same shuffle). Adam scales each step by the history of
    # gradient sizes, so a last gradient halved by a divisor of 2 instead of 1 changes the result.
    start = get_trainable_state(lora)
    accumulated = _fit(lora, examples, tokenizer, start, batch_size=2, grad_accum=2)
    whole = _fit(lora, examples, tokenizer, start, batch_size=4, grad_accum=1)
    assert num_optimizer_steps(len(examples), TrainConfig(batch_size=2, grad_accum=2)) == 3
    assert _distance(accumulated, start) > 0.1
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fedprox_pulls_the_update_toward_the_global_state(lora, examples, tokenizer):
    start = get_trainable_state(lora)
    free = _fit(lora, examples, tokenizer, start, batch_size=2, local_epochs=2)
    pulled = _fit(lora, examples, tokenizer, start, batch_size=2, local_epochs=2, fedprox_mu=1.0)
    assert _distance(pulled, start) < 0.5 * _distance(free, start)


def test_bf16_autocast_runs_the_forward_in_bfloat16(lora, examples, tokenizer):
    dtypes: list[torch.dtype] = []
    head = lora.get_base_model().lm_head
    hook = head.register_forward_hook(lambda _module, _inputs, out: dtypes.append(out.dtype))
    try:
        start = get_trainable_state(lora)
        update = fit(lora, examples, TrainConfig(learning_rate=1e-2, batch_size=4, bf16=True), start,
                     seed=0, pad_token_id=tokenizer.pad_token_id, progress=False)
    finally:
        hook.remove()
    # 10 examples in batches of 4; the head runs at answer positions, again in backward (fedpeft.losses)
    assert dtypes == [torch.bfloat16] * 6
    assert math.isfinite(update.metrics["train_loss"]) and update.metrics["train_loss"] > 0
    assert all(t.dtype == torch.float32 for t in update.state.values())  # the weights stay fp32
    assert _distance(update.state, start) > 0


def test_gradient_checkpointing_gives_the_same_update(tokenizer):
    from fedpeft.adapters import get_trainable_state
    from fedpeft.config import TrainConfig, validate_tree
    from fedpeft.data.prompts import tokenize_examples
    from fedpeft.trainer import fit
    from fedpeft.worker import build_worker
    from tiny_jobs import tiny_job

    rows = [{"question": f"What is condition {i}?", "answer": f"Condition {i} is made up."} for i in range(4)]
    examples = tokenize_examples(tokenizer, rows, 48)
    updates = []
    for checkpointing in (False, True):
        job = {**tiny_job("gc"), "train": {"gradient_checkpointing": checkpointing}}
        worker = build_worker(validate_tree(job), "cpu")
        assert worker.model.get_base_model().is_gradient_checkpointing == checkpointing
        updates.append(fit(worker.model, examples, TrainConfig(max_steps=2, batch_size=2, learning_rate=1e-2),
                           get_trainable_state(worker.model), seed=0, pad_token_id=tokenizer.pad_token_id,
                           progress=False).state)
    assert all(torch.allclose(updates[0][k], updates[1][k], atol=1e-6) for k in updates[0])
