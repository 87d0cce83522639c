"""Memory plan for bigger bases: measured activation bytes per token per layer, and the arithmetic.

:func:`saved_bytes_per_token_layer` counts exactly what autograd keeps for backward (saved-tensor
hooks, each storage once) in a LoRA r16 all-linear training forward of a random slice of a
target shape, with 2 and with 1 decoder layers: the difference is one layer. It runs through
fedpeft's own code (``wrap_model``, ``recompute_lora_dropout``, ``answer_nll``) on CPU.
:func:`plan_rows` turns it into per-worker memory for each base and precision.
"""

from __future__ import annotations

import torch

GIB = 1024**3
GPUS = [("T4/V100", 16), ("A10/RTX 4090", 24), ("A100", 40), ("A100/H100", 80)]
TOKENS = 4 * 512  # batch 4 x seq 512
RANK = 16
CUDA_OVERHEAD = 1 * GIB  # context and allocator slack
NF4_DQ = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits + uint8 absmax per 64 + fp32 scale per 256 absmax blocks
SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings
    "Llama-3.2-1B": dict(hidden=2048, inter=8192, layers=16, heads=32, kv=8, vocab=128256, tied=True),
    "Llama-2-7B": dict(hidden=4096, inter=11008, layers=32, heads=32, kv=32, vocab=32000, tied=False),
    "Llama-2-13B": dict(hidden=5120, inter=13824, layers=40, heads=40, kv=40, vocab=32000, tied=False),
}


def _slice(shape: dict, layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedpeft.peft_methods import build_peft_method, wrap_model
    from fedpeft.recompute import recompute_lora_dropout

    config = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["inter"], num_hidden_layers=layers,
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv"], vocab_size=256,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = wrap_model(LlamaForCausalLM(config), build_peft_method("lora", {"r": RANK}))
    recompute_lora_dropout(model)
    return model.train()


def _saved(model: torch.nn.Module, tokens: int) -> int:
    from fedpeft.losses import answer_nll

    seen: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # kept by reference, not activations

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        answer_nll(model, batch)
    return sum(seen.values())


def saved_bytes_per_token_layer(shape: dict, tokens: int) -> dict[str, float]:
    """Bytes autograd keeps per token per decoder layer, in fp32 and in bf16 weights."""
    out = {}
    models = {n: _slice(shape, n) for n in (1, 2)}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        per = {n: _saved(m.to(dtype), tokens) for n, m in models.items()}
        out[name] = (per[2] - per[1]) / tokens
    return out


def _params(s: dict) -> tuple[int, int, int, int]:
    """(linear weights, their output rows, embeddings + head, norms) of a Llama shape."""
    head_dim = s["hidden"] // s["heads"]
    kv = s["kv"] * head_dim
    per_layer = 2 * s["hidden"] ** 2 + 2 * s["hidden"] * kv + 3 * s["hidden"] * s["inter"]
    rows = 2 * s["hidden"] + 2 * kv + 2 * s["inter"] + s["hidden"]
    emb = s["vocab"] * s["hidden"] * (1 if s["tied"] else 2)
    return s["layers"] * per_layer, s["layers"] * rows, emb, (2 * s["layers"] + 1) * s["hidden"]


def _lora_params(s: dict) -> int:
    kv = s["kv"] * (s["hidden"] // s["heads"])
    h, i = s["hidden"], s["inter"]
    pairs = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    return s["layers"] * RANK * sum(a + b for a, b in pairs)


def weight_bytes(s: dict, precision: str) -> float:
    linear, rows, emb, norms = _params(s)
    if precision == "fp32":
        return 4 * (linear + emb + norms)
    if precision == "bf16":
        return 2 * (linear + emb + norms)
    rest = 4 * (emb + norms)  # prepare_model_for_kbit_training keeps them in fp32
    return (linear + 4 * rows if precision == "8bit" else NF4_DQ * linear) + rest


def _fits(total: float) -> str:
    return next((name for name, gb in GPUS if total <= 0.9 * gb * GIB), "none ≤ 80 GB")


def plan_rows(per_layer: dict[str, dict[str, float]]) -> list[dict]:
    """Per-worker memory of each base x precision, with and without gradient checkpointing."""
    from fedpeft.losses import CHUNK_TOKENS

    rows = []
    for name, s in SHAPES.items():
        for precision in ("fp32", "bf16", "8bit", "4bit"):
            act_dtype, elem = ("fp32", 4) if precision == "fp32" else ("bf16", 2)
            layer = per_layer[name][act_dtype] * TOKENS
            head = 3 * CHUNK_TOKENS * s["vocab"] * 4  # one chunk's fp32 logits, log-softmax and gradient
            act = s["layers"] * layer + head
            act_gc = s["layers"] * TOKENS * s["hidden"] * elem + layer + head
            weights, adapter = weight_bytes(s, precision), 16 * _lora_params(s)
            total, total_gc = (weights + adapter + a + CUDA_OVERHEAD for a in (act, act_gc))
            rows.append({"model": name, "precision": precision, "weights": weights, "adapter": adapter, "act": act,
                         "act_gc": act_gc, "total": total, "total_gc": total_gc,
                         "fits": f"{_fits(total)} / {_fits(total_gc)}"})
    return rows
