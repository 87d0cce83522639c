"""Shared fixtures: the tiny random Llama (hidden 64, 2 layers) and its tokenizer."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from fedpeft.config import ModelConfig

MEDQUAD = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "medquad"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_base():
    """(model, tokenizer) of the tiny random Llama; copy the model before mutating it."""
    from fedpeft.models import load_base_model

    return load_base_model(ModelConfig(name="tiny-random-llama"))


@pytest.fixture(scope="session")
def sharp(tiny_base) -> torch.nn.Module:
    """The tiny Llama with larger random weights (read-only). The plain tiny model emits one token
    forever and predicts almost uniformly; this one answers each prompt differently and its
    predictions are far from uniform, so broken batching, a misaligned label or a missing adapter
    shows well beyond float noise."""
    model = copy.deepcopy(tiny_base[0])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.fixture
def tiny_model(tiny_base):
    return copy.deepcopy(tiny_base[0])


@pytest.fixture(scope="session")
def tokenizer(tiny_base):
    return tiny_base[1]


@pytest.fixture
def medquad_dir() -> Path:
    if not (MEDQUAD / "train.jsonl").is_file():
        pytest.skip(f"MedQuAD not found at {MEDQUAD} (expected ../shared/datasets/medquad beside the repo)")
    return MEDQUAD
