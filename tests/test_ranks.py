"""Heterogeneous LoRA ranks: truncation and padding, zero components that stay zero, smaller bytes."""

from __future__ import annotations

import pytest
import torch

from fedpeft.adapters import get_trainable_state
from fedpeft.config import TrainConfig, validate_tree
from fedpeft.data.prompts import tokenize_examples
from fedpeft.errors import ConfigError
from fedpeft.io_utils import read_jsonl
from fedpeft.ranks import pad, truncate, truncated_shapes
from fedpeft.simulation import run_job
from fedpeft.trainer import fit
from fedpeft.worker import build_worker
from tiny_jobs import tiny_job

A, B = "x.lora_A.default.weight", "x.lora_B.default.weight"


def test_truncate_keeps_the_first_components_and_pad_restores_the_shapes_with_zeros():
    state = {A: torch.arange(12.0).view(3, 4), B: torch.arange(6.0).view(2, 3), "bias": torch.ones(2)}
    small = truncate(state, 2)
    assert torch.equal(small[A], torch.tensor([[0.0, 1, 2, 3], [4, 5, 6, 7]]))
    assert torch.equal(small[B], torch.tensor([[0.0, 1], [3, 4]])) and small["bias"] is state["bias"]
    assert truncated_shapes({k: v.shape for k, v in state.items()}, 2) == {k: v.shape for k, v in small.items()}
    full = pad(small, {k: v.shape for k, v in state.items()})
    assert torch.equal(full[A][2], torch.zeros(4)) and torch.equal(full[B][:, 2], torch.zeros(2))
    assert torch.equal(full[A][:2], state[A][:2])


def test_components_beyond_a_clients_rank_stay_exactly_zero_while_it_trains(tokenizer):
    cfg = validate_tree({**tiny_job("r"), "peft": {"method": "lora", "r": 4}})
    worker = build_worker(cfg, "cpu")
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in get_trainable_state(worker.model).items()}
    start = pad(truncate(state, 1), {k: v.shape for k, v in state.items()})
    examples = tokenize_examples(tokenizer, [{"question": "What is gout?", "answer": "A kind of arthritis."}] * 4, 32)
    update = fit(worker.model, examples, TrainConfig(max_steps=3, batch_size=2, learning_rate=1e-2), start, seed=0,
                 pad_token_id=tokenizer.pad_token_id, client_id="c", progress=False)
    lora = [k for k in update.state if ".lora_" in k]
    assert lora and all(torch.equal(update.state[k], pad(truncate(update.state, 1), {k: v.shape for k, v in
                                                                                    update.state.items()})[k])
                        for k in lora)  # nothing beyond rank 1
    assert any(not torch.equal(update.state[k][:1] if ".lora_A." in k else update.state[k][:, :1],
                               start[k][:1] if ".lora_A." in k else start[k][:, :1]) for k in lora)  # it trained


def test_a_run_with_client_ranks_sends_each_client_its_ranks_bytes(tmp_path):
    job = {**tiny_job("ranks", clients=2), "peft": {"method": "lora", "r": 4}, "workspace": str(tmp_path)}
    job["federation"] = {**job["federation"], "client_ranks": [1, 4]}
    run = run_job(validate_tree(job))
    clients = [r for r in read_jsonl(run.metrics_file) if r["event"] == "round"][0]["clients"]
    small, full = clients[0], clients[1]
    assert small["bytes_down"] == small["bytes_up"] and full["bytes_down"] == full["bytes_up"]
    assert small["bytes_up"] < full["bytes_up"] / 3  # rank 1 of 4 (the tiny model has no biases)


def test_rank_problems_are_config_errors(tmp_path):
    job = {**tiny_job("bad", clients=2), "peft": {"method": "lora", "r": 4}}
    for ranks, message in [([1], "lists 1 ranks but federation.num_clients is 2"),
                           ([1, 8], r"must be <= peft.r \(4\)"), ([0, 2], "greater than or equal to 1")]:
        with pytest.raises(ConfigError, match=message):
            validate_tree({**job, "federation": {**job["federation"], "client_ranks": ranks}})
    ptuning = {**job, "peft": {"method": "ptuning"}, "federation": {**job["federation"], "client_ranks": [1, 2]}}
    with pytest.raises(ConfigError, match="need peft.method lora or ffa_lora"):
        validate_tree(ptuning)
