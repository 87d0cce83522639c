"""Adapter invariants on the tiny model: what trains, what travels, exact swaps and round trips."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from fedpeft.adapters import get_trainable_state, set_trainable_state, state_nbytes
from fedpeft.config import TrainConfig
from fedpeft.data.prompts import tokenize_examples
from fedpeft.errors import AggregationError
from fedpeft.peft_methods import PEFT_METHODS, build_peft_method, wrap_model
from fedpeft.errors import RegistryError
from fedpeft.trainer import fit

ROWS = [{"question": f"What is condition {i}?", "answer": f"Condition {i} is a made-up illness number {i}."}
        for i in range(8)]
METHODS = [("lora", {"r": 4}), ("lora", {"r": 2, "target_modules": ["q_proj", "v_proj"]}),
           ("ptuning", {"num_virtual_tokens": 4, "encoder_hidden_size": 16}),
           ("lora", {"r": 2, "use_dora": True}), ("lora", {"r": 2, "use_rslora": True}), ("ffa_lora", {"r": 2}),
           ("ia3", {}), ("prompt_tuning", {"num_virtual_tokens": 4}),
           ("prefix", {"num_virtual_tokens": 3, "encoder_hidden_size": 8})]


def _wrapped(model, method, params):
    torch.manual_seed(0)
    return wrap_model(model, build_peft_method(method, params))


@pytest.mark.parametrize("method,params", METHODS)
def test_only_adapter_parameters_change(tiny_model, tokenizer, method, params):
    model = _wrapped(tiny_model, method, params)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    examples = tokenize_examples(tokenizer, ROWS, 64)
    update = fit(model, examples, TrainConfig(learning_rate=1e-2, batch_size=4), get_trainable_state(model),
                 seed=0, pad_token_id=tokenizer.pad_token_id, progress=False)
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= trainable
    assert set(update.state) == trainable  # every trainable parameter travels (P-Tuning: the encoder too)
    if method == "ptuning":
        assert any("prompt_encoder" in n and "mlp" in n for n in update.state)
    if params.get("use_dora"):
        assert any("lora_magnitude_vector" in n for n in update.state)  # DoRA's magnitudes travel too
    assert update.num_examples == len(ROWS) and update.metrics["steps"] == 2


@pytest.mark.parametrize("method,params", METHODS)
def test_swap_in_and_out_restores_exact_tensors(tiny_model, method, params):
    model = _wrapped(tiny_model, method, params)
    a = get_trainable_state(model)
    b = {k: torch.randn_like(v) for k, v in a.items()}
    set_trainable_state(model, b)
    assert all(torch.equal(get_trainable_state(model)[k], b[k]) for k in b)
    set_trainable_state(model, a)
    assert all(torch.equal(get_trainable_state(model)[k], a[k]) for k in a)
    assert state_nbytes(a) == 4 * sum(v.numel() for v in a.values())


def test_lora_state_round_trips_through_save_pretrained(tiny_base, tmp_path):
    model = _wrapped(copy.deepcopy(tiny_base[0]), "lora", {"r": 4})
    state = {k: torch.randn_like(v) for k, v in get_trainable_state(model).items()}
    set_trainable_state(model, state)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(tiny_base[0]), tmp_path, is_trainable=True)
    got = get_trainable_state(loaded)
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)


def test_mismatched_state_is_a_clear_error(tiny_model):
    model = _wrapped(tiny_model, "lora", {"r": 4})
    state = get_trainable_state(model)
    state.pop(next(iter(state)))
    with pytest.raises(AggregationError, match="missing"):
        set_trainable_state(model, state)


def test_unknown_peft_method_lists_valid_names():
    with pytest.raises(RegistryError, match="lora.*ptuning"):
        PEFT_METHODS.get("loraa")
