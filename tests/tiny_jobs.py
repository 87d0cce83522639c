"""A small federated job on the tiny model and the shipped sample, for tests of the round loop."""

from __future__ import annotations

from typing import Any

QUIET_EVAL = {"every": 0, "zero_shot": False, "max_new_tokens": 2, "metrics": ["rougeL"], "heldout_loss": False}


def tiny_job(name: str, *, seed: int = 0, clients: int = 2, test_rows: int = 2,
             eval: dict[str, Any] | None = None) -> dict[str, Any]:
    """A 2-round LoRA r2 job of ``clients`` IID clients, one optimizer step each per round."""
    return {
        "job": name, "seed": seed, "model": {"name": "tiny-random-llama"}, "peft": {"method": "lora", "r": 2},
        "data": {"train": "builtin:sample", "test_ratio": 0.1, "split_by": "focus", "max_seq_len": 64,
                 "max_test_samples": test_rows},
        "federation": {"num_clients": clients, "rounds": 2, "partition": {"method": "iid"}},
        "train": {"learning_rate": 5e-3, "batch_size": 4, "max_steps": 1},
        "eval": eval or QUIET_EVAL,
    }
