"""Memory savers on the tiny model: answer-position loss (fedpeft.losses), recomputed LoRA
dropout (fedpeft.recompute), and the once-per-worker memory breakdown (fedpeft.memory).

Each saver must give the numbers of the ordinary path and keep fewer bytes for backward; the
bytes are counted with autograd's saved-tensor hooks, which see exactly what backward keeps.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import fedpeft.losses as losses
from fedpeft.adapters import get_trainable_state
from fedpeft.config import JobConfig, TrainConfig
from fedpeft.data.prompts import IGNORE_INDEX
from fedpeft.peft_methods import build_peft_method, wrap_model
from fedpeft.recompute import DropoutLinear, recompute_lora_dropout
from fedpeft.trainer import fit
from fedpeft.worker import build_worker


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 2000, (3, 16), generator=g)
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX  # the prompt
    labels[2, 12:] = IGNORE_INDEX  # a shorter row, right-padded
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _saved_bytes(fn) -> int:  # noqa: ANN001
    """Bytes autograd keeps for backward while ``fn()`` runs (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _nonzero_b(model: torch.nn.Module) -> None:
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("method", ["lora", "ptuning", "prefix"])
def test_answer_nll_equals_the_models_own_loss(tiny_model, method):
    torch.manual_seed(0)
    model = wrap_model(tiny_model, build_peft_method(method, {}))
    model.eval()
    batch = _batch()
    sums, counts = losses.answer_nll(model, batch)
    assert counts.tolist() == [10, 10, 6]  # positions 6..15 predict tokens 7..16; row 2 stops at 12
    expected = model(**batch).loss  # transformers' full-logits loss, token-weighted mean
    torch.testing.assert_close(sums.sum() / counts.sum(), expected, rtol=1e-6, atol=1e-6)


def test_the_head_sees_only_answer_positions_in_chunks_and_the_gradient_is_unchanged(tiny_model, monkeypatch):
    torch.manual_seed(0)
    model = wrap_model(tiny_model, build_peft_method("lora", {"r": 4, "dropout": 0.0}))
    _nonzero_b(model)
    batch = _batch()
    model.zero_grad()
    model(**batch).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    full = _saved_bytes(lambda: model(**batch).loss)

    monkeypatch.setattr(losses, "CHUNK_TOKENS", 8)
    rows: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, inp, _o: rows.append(inp[0].shape[0]))
    model.zero_grad()
    try:
        sums, counts = losses.answer_nll(model, batch)
        (sums.sum() / counts.sum()).backward()
    finally:
        hook.remove()
    assert sorted(rows) == [2, 2, 8, 8, 8, 8, 8, 8]  # 26 answer positions in chunks of 8, again in backward
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)
    chunked = _saved_bytes(lambda: losses.answer_nll(model, batch))
    vocab_row = model.get_output_embeddings().weight.shape[0] * 4
    assert full - chunked > 3 * 16 * vocab_row  # full-vocab fp32 logits of 3 x 16 positions are not kept


def test_a_head_with_soft_capping_takes_the_full_logits_path(tiny_model):
    model = copy.deepcopy(tiny_model)
    model.config.final_logit_softcapping = 30.0  # Gemma 2 style: logits are not head(hidden) alone
    assert losses._plain_head(model) is None
    batch = _batch()
    sums, counts = losses.answer_nll(model, batch)
    torch.testing.assert_close(sums.sum() / counts.sum(), model(**batch).loss, rtol=1e-6, atol=1e-6)


def _lora_pair(tiny_model):  # noqa: ANN001
    """Two identical LoRA models with dropout 0.3; the second has its dropout recomputed."""
    plain = wrap_model(copy.deepcopy(tiny_model), build_peft_method("lora", {"r": 4, "dropout": 0.3}))
    _nonzero_b(plain)
    lean = copy.deepcopy(plain)
    assert recompute_lora_dropout(lean) == 14  # 2 layers x 7 linear modules
    return plain, lean


def test_recomputed_dropout_gives_bit_identical_gradients_and_names(tiny_model):
    plain, lean = _lora_pair(tiny_model)
    assert get_trainable_state(plain).keys() == get_trainable_state(lean).keys()
    batch = _batch()
    grads, after = [], []
    for model in (plain, lean):
        model.train()
        torch.manual_seed(7)
        model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        after.append(torch.rand(3))  # the random stream continues as without recomputation
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    assert any(float(g.abs().sum()) > 0 for n, g in grads[1].items() if "lora_A" in n)
    assert torch.equal(after[0], after[1])


def test_recomputed_dropout_keeps_less_for_backward(tiny_model):
    plain, lean = _lora_pair(tiny_model)
    batch = _batch()
    for model in (plain, lean):
        model.train()
    kept = [_saved_bytes(lambda m=m: m(**batch).loss) for m in (plain, lean)]
    # per token, 7 dropped copies of the layer input (5 of width 64, 2 of 128) and their masks
    assert kept[0] - kept[1] >= 2 * 48 * (5 * 64 + 128) * 4


def test_build_worker_recomputes_dropout_except_under_example_level_dp():
    job = {"job": "t", "model": {"name": "tiny-random-llama"}, "peft": {"method": "lora", "dropout": 0.1}}
    lean = build_worker(JobConfig.model_validate(job), "cpu").model
    assert sum(isinstance(m, DropoutLinear) for m in lean.modules()) == 14
    private = build_worker(JobConfig.model_validate({**job, "privacy": {"level": "example", "noise_multiplier": 1.0}}), "cpu")
    assert not any(isinstance(m, DropoutLinear) for m in private.model.modules())


def test_the_first_training_logs_the_memory_breakdown_once(tiny_model, tokenizer, caplog):
    from fedpeft.data.prompts import tokenize_examples

    model = wrap_model(tiny_model, build_peft_method("lora", {"r": 4}))
    rows = [{"question": f"What is {i}?", "answer": f"It is number {i}."} for i in range(4)]
    examples = tokenize_examples(tokenizer, rows, max_seq_len=32)
    cfg = TrainConfig(batch_size=2, max_steps=1)
    with caplog.at_level(logging.INFO, logger="fedpeft.memory"):
        first = fit(model, examples, cfg, get_trainable_state(model), seed=0, pad_token_id=tokenizer.pad_token_id,
                    progress=False)
        second = fit(model, examples, cfg, get_trainable_state(model), seed=1, pad_token_id=tokenizer.pad_token_id,
                     progress=False)
    frozen = sum(p.numel() * 4 for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert first.metrics["memory_base_weights_bytes"] >= frozen
    assert first.metrics["memory_adapter_optimizer_bytes"] == trainable * 4 * 4
    assert first.metrics["memory_peak_activation_bytes"] >= 0
    assert not any(k.startswith("memory_") for k in second.metrics)
    lines = [r.getMessage() for r in caplog.records if "peak activations" in r.getMessage()]
    assert len(lines) == 1 and "base weights" in lines[0] and "adapter + AdamW" in lines[0]
