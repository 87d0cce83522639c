"""QLoRA bases: bitsandbytes 4-bit and 8-bit (it runs on CPU since 0.48), adapters fp32 on the wire."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fedpeft.config import validate_tree
from fedpeft.errors import ModelError
from fedpeft.io_utils import read_jsonl
from fedpeft.simulation import run_job
from tiny_jobs import tiny_job

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


@needs_bnb
@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_a_quantised_base_learns_and_runs_two_federated_rounds(tmp_path, tokenizer, mode):
    from fedpeft.adapters import get_trainable_state
    from fedpeft.config import TrainConfig
    from fedpeft.data.prompts import tokenize_examples
    from fedpeft.evaluation import heldout_loss
    from fedpeft.trainer import fit
    from fedpeft.worker import build_worker

    job = {**tiny_job(f"q{mode}", test_rows=2), "workspace": str(tmp_path),
           "model": {"name": "tiny-random-llama", "quantization": mode}}
    worker = build_worker(validate_tree(job), "cpu")
    layer = type(worker.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__
    assert layer == ("Linear4bit" if mode == "4bit" else "Linear8bitLt")
    rows = [{"question": "What is gout?", "answer": "Gout is a kind of arthritis."}] * 4
    examples = tokenize_examples(tokenizer, rows, 32)
    before = heldout_loss(worker.model, examples, pad_token_id=tokenizer.pad_token_id)
    fit(worker.model, examples, TrainConfig(max_steps=6, batch_size=4, learning_rate=5e-2),
        get_trainable_state(worker.model), seed=0, pad_token_id=tokenizer.pad_token_id, progress=False)
    assert heldout_loss(worker.model, examples, pad_token_id=tokenizer.pad_token_id) < before - 0.1  # 10.81 -> ~10.56
    run = run_job(validate_tree(job))  # and through the round loop, evaluation included
    summary = run.read_summary()
    assert summary["update_bytes"] == 4 * summary["trainable_parameters"]  # fp32 on the wire
    assert len([r for r in read_jsonl(run.metrics_file) if r["event"] == "round"]) == 2


def test_without_bitsandbytes_quantisation_is_a_model_error_saying_what_works(monkeypatch):
    import fedpeft.models as models

    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    with pytest.raises(ModelError, match="needs bitsandbytes.*quantization: none with dtype: bfloat16"):
        models.load_base_model(validate_tree({**tiny_job("q"), "model": {"name": "tiny-random-llama",
                                                                         "quantization": "4bit"}}).model)


def test_bf16_base_with_lora_trains_and_the_adapter_stays_fp32(tmp_path):
    job = {**tiny_job("bf16", test_rows=2), "workspace": str(tmp_path),
           "model": {"name": "tiny-random-llama", "dtype": "bfloat16"}}
    run = run_job(validate_tree(job))
    assert len([r for r in read_jsonl(run.metrics_file) if r["event"] == "round"]) == 2
    from safetensors.torch import load_file

    final = load_file(str(run.path / "checkpoints" / "round-0002" / "global_state.safetensors"))
    assert all(v.dtype == torch.float32 for v in final.values())  # the adapter travels in fp32
