"""Example-level DP-SGD on the tiny model: clipping, noise, seeding, model restored, LoRA and P-Tuning."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from opacus.optimizers import DPOptimizer
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fedpeft.adapters import get_trainable_state, set_trainable_state, trainable_parameters
from fedpeft.config import PrivacyConfig, TrainConfig
from fedpeft.data.prompts import collate, tokenize_examples
from fedpeft.peft_methods import build_peft_method, wrap_model
from fedpeft.privacy.accounting import epsilon
from fedpeft.privacy.example_level import (
    dp_local_steps,
    dp_schedule,
    example_level_epsilon,
    example_level_noise,
    per_example_loss,
)
from fedpeft.state import State
from fedpeft.trainer import fit

# Answers of different lengths: examples differ in length and in their number of answer tokens.
ROWS = [{"question": f"What is condition {i}?", "answer": "It is a made-up illness" + " and more" * i + "."}
        for i in range(6)]
METHODS = {
    "lora": ("lora", {"r": 4, "dropout": 0.0}),
    "ptuning": ("ptuning", {"num_virtual_tokens": 4, "encoder_hidden_size": 16}),
    "ptuning-lstm": ("ptuning", {"num_virtual_tokens": 4, "encoder_hidden_size": 16, "encoder_type": "LSTM"}),
}
# q = batch_size * grad_accum / 6 = 1: one step over all six examples, in micro-batches of 4 + 2.
WHOLE_BATCH = TrainConfig(learning_rate=1e-2, batch_size=2, grad_accum=3)


@pytest.fixture(scope="module")
def examples(tokenizer):
    return tokenize_examples(tokenizer, ROWS, max_seq_len=64)


def _wrap(tiny_model, method: str):
    torch.manual_seed(0)
    name, params = METHODS[method]
    return wrap_model(tiny_model, build_peft_method(name, params))


def _dp(model, examples, tokenizer, noise: float, clip: float = 1.0, train: TrainConfig = WHOLE_BATCH,
        seed: int = 0) -> dict:
    privacy = PrivacyConfig(level="example", max_grad_norm=clip)
    return dp_local_steps(model, examples, train, privacy, noise, seed=seed, pad_token_id=tokenizer.pad_token_id,
                          progress=False)


@contextmanager
def inner_steps(model) -> Iterator[list[State]]:
    """The gradients the wrapped AdamW receives at each of its steps (after clipping and noise)."""
    names = {id(p): n for n, p in trainable_parameters(model).items()}
    grads: list[State] = []

    def hook(optimizer, _args, _kwargs):
        if not isinstance(optimizer, DPOptimizer):
            grads.append({names[id(p)]: p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]})

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield grads
    finally:
        handle.remove()


def _example_gradient(model, example, pad_token_id: int) -> State:
    """One example's gradient by plain autograd on a batch of one, through PEFT's own forward."""
    batch = collate([example], pad_token_id)
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_example_loss(logits, batch["labels"]).sum().backward()
    grads = {n: p.grad.clone() for n, p in trainable_parameters(model).items()}
    model.zero_grad(set_to_none=True)
    return grads


def _norm(state: State) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in state.values()))


@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_each_example_gradient_is_clipped_before_summing(tiny_model, examples, tokenizer, method):
    model = _wrap(tiny_model, method)
    clip = 1e-3
    per_example = [_example_gradient(model, ex, tokenizer.pad_token_id) for ex in examples]
    assert min(_norm(g) for g in per_example) > 10 * clip  # every example is clipped
    expected = {n: sum(g[n] * (clip / _norm(g)) for g in per_example) / len(examples) for n in per_example[0]}
    forwards: list[int] = []
    handle = model.get_base_model().register_forward_hook(lambda *_: forwards.append(1))
    try:
        with inner_steps(model) as grads:
            _dp(model, examples, tokenizer, noise=0.0, clip=clip)
    finally:
        handle.remove()
    assert len(grads) == 1 and len(forwards) == 2  # one step, two micro-batches (4 + 2 rows)
    # Clipping the batch's sum instead (or P-Tuning's shared prompt seen as one example) fails here.
    for name, want in expected.items():
        torch.testing.assert_close(grads[0][name], want, rtol=2e-3, atol=1e-9, msg=name)
    assert _norm(grads[0]) <= clip + 1e-9


def test_noise_has_the_configured_std(tiny_model, examples, tokenizer):
    model = _wrap(tiny_model, "lora")
    start = get_trainable_state(model)
    sigma, clip = 0.7, 0.5
    with inner_steps(model) as clean:
        _dp(model, examples, tokenizer, noise=0.0, clip=clip)
    set_trainable_state(model, start)
    with inner_steps(model) as noisy:
        _dp(model, examples, tokenizer, noise=sigma, clip=clip)
    # Same seed, same batch: the difference is the noise, divided by the expected batch size (6).
    noise = torch.cat([(noisy[0][n] - clean[0][n]).flatten() for n in start]) * len(examples)
    assert noise.numel() > 5000
    # The sample std of n normals is within 4 standard errors (std / sqrt(2n)) of the true std.
    tolerance = 4 * sigma * clip / math.sqrt(2 * noise.numel())
    assert abs(float(noise.std()) - sigma * clip) < tolerance
    assert abs(float(noise.mean())) < 4 * sigma * clip / math.sqrt(noise.numel())


def test_empty_poisson_batches_still_take_a_noisy_step(tiny_model, examples, tokenizer):
    model = _wrap(tiny_model, "lora")
    train = TrainConfig(learning_rate=1e-2, batch_size=1, local_epochs=2)  # q = 1/6, 12 steps
    forwards: list[int] = []
    handle = model.get_base_model().register_forward_hook(lambda *_: forwards.append(1))
    try:
        with inner_steps(model) as grads:
            metrics = _dp(model, examples, tokenizer, noise=1.0, train=train)
    finally:
        handle.remove()
    assert metrics["dp_steps"] == len(grads) == 12 and metrics["dp_sample_rate"] == pytest.approx(1 / 6)
    assert len(forwards) < 12  # some Poisson batches were empty (P = (5/6)^6 = 0.33 each) ...
    assert all(_norm(g) > 0 for g in grads)  # ... and still released noise


def test_same_seed_same_update_other_seed_other_update(tiny_model, examples, tokenizer):
    model = _wrap(tiny_model, "lora")
    start = get_trainable_state(model)
    train = TrainConfig(learning_rate=1e-2, batch_size=2, max_steps=2)
    updates = []
    for seed in (0, 0, 1):
        set_trainable_state(model, start)
        _dp(model, examples, tokenizer, noise=1.0, train=train, seed=seed)
        updates.append(get_trainable_state(model))
    for name in start:
        assert torch.equal(updates[0][name], updates[1][name]), name
    assert any(not torch.allclose(updates[0][n], updates[2][n]) for n in start)


def _hooks(model) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
            for m in model.modules()]


@pytest.mark.parametrize("method", ["lora", "ptuning-lstm"])
def test_the_shared_model_is_left_as_it_was(tiny_base, tiny_model, examples, tokenizer, method):
    model = _wrap(tiny_model, method)
    start = get_trainable_state(model)
    modules = [(n, type(m)) for n, m in model.named_modules()]
    params = {n: id(p) for n, p in model.named_parameters()}
    hooks = _hooks(model)
    _dp(model, examples, tokenizer, noise=1.0, train=TrainConfig(learning_rate=1e-2, batch_size=2, max_steps=2))
    assert [(n, type(m)) for n, m in model.named_modules()] == modules  # the LSTM is back
    assert {n: id(p) for n, p in model.named_parameters()} == params
    assert _hooks(model) == hooks
    leftovers = [n for n, p in model.named_parameters() if set(vars(p)) & {"grad_sample", "summed_grad"}]
    assert leftovers == [] and all(p.grad is None for p in model.parameters())
    # Ordinary training afterwards gives exactly what it gives on a model that never saw Opacus.
    cfg = TrainConfig(learning_rate=1e-2, batch_size=3)
    after = fit(model, examples, cfg, start, seed=0, pad_token_id=tokenizer.pad_token_id, progress=False).state
    fresh = _wrap(tiny_base[0].__class__(tiny_base[0].config), method)
    fresh.load_state_dict(model.state_dict())
    never = fit(fresh, examples, cfg, start, seed=0, pad_token_id=tokenizer.pad_token_id, progress=False).state
    for name in start:
        torch.testing.assert_close(after[name], never[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("method", list(METHODS))
def test_lora_and_ptuning_train_under_dp(tiny_model, examples, tokenizer, method):
    model = _wrap(tiny_model, method)
    start = get_trainable_state(model)
    metrics = _dp(model, examples, tokenizer, noise=0.5, train=TrainConfig(learning_rate=1e-2, batch_size=2,
                                                                         max_steps=2))
    end = get_trainable_state(model)
    assert math.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0
    assert metrics["dp_steps"] == 2 and metrics["dp_noise_multiplier"] == 0.5
    assert all(not torch.equal(start[n], end[n]) for n in start)  # noise reaches every adapter tensor
    assert list(end) == list(start)


def test_per_example_loss_matches_the_model_loss_of_a_single_example(tiny_model, examples, tokenizer):
    for method in ("lora", "ptuning"):
        model = _wrap(tiny_model.__class__(tiny_model.config), method)
        batch = collate(examples[2:3], tokenizer.pad_token_id)
        out = model(**batch)  # PEFT adds the virtual tokens' labels itself
        torch.testing.assert_close(per_example_loss(out.logits, batch["labels"])[0], out.loss)


def test_example_level_epsilon_grows_with_rounds():
    train = TrainConfig(batch_size=8, local_epochs=1)
    assert dp_schedule(200, train) == (25, 0.04)
    eps = [example_level_epsilon(1.0, 200, train, rounds, 1e-5) for rounds in (0, 1, 5, 20)]
    assert eps[0] == 0.0 and eps[1] < eps[2] < eps[3]
    assert eps[2] == pytest.approx(epsilon(1.0, 0.04, 125, 1e-5))
    assert 1 < eps[1] < 4 and 4 < eps[3] < 10  # 2.23 and 6.52 by RDP
    assert eps[3] < 4 * eps[1]  # composition grows like sqrt(rounds), not like rounds (20x)
    assert example_level_epsilon(0.0, 200, train, 1, 1e-5) == math.inf
    noise = example_level_noise(3.0, 200, train, 5, 1e-5)
    assert example_level_epsilon(noise, 200, train, 5, 1e-5) <= 3.0 < example_level_epsilon(noise * 0.98, 200,
                                                                                                 train, 5, 1e-5)
