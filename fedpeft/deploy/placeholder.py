"""PLACEHOLDERS for the Flower prototype: to be replaced by the real fedpeft core.

Everything here stands in for a real piece so the deployment can be tested without a model:

- :func:`initial_state` -> ``fedpeft.models.load_base_model`` + PEFT wrapping +
  ``fedpeft.adapters.get_trainable_state(model)`` on the server.
- :func:`load_examples` -> ``fedpeft.data.io`` loading of the node's JSONL (``data-path``).
- :func:`placeholder_fit` -> ``fedpeft.trainer.fit(model, tokenizer, examples, cfg.train,
  global_state, seed)``, which returns the same :class:`~fedpeft.types.ClientUpdate`.

The placeholder "training" is deterministic so a test can predict the aggregate: every tensor
moves by the mean of the examples' ``"x"`` field.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from fedpeft.constants import KEY_SECONDS, KEY_STEPS, KEY_TRAIN_LOSS
from fedpeft.errors import DataError
from fedpeft.types import ClientUpdate, State

# Shapes of a rank-4 LoRA pair on a 16-dim layer: small, but two tensors with distinct shapes.
_PLACEHOLDER_SHAPES = {"layer0.lora_A.weight": (4, 16), "layer0.lora_B.weight": (16, 4)}


def initial_state(seed: int) -> State:
    """PLACEHOLDER: a small fixed "adapter" state (real: the PEFT model's trainable state)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) for k, shape in _PLACEHOLDER_SHAPES.items()}


def load_examples(data_path: str | Path) -> list[dict]:
    """PLACEHOLDER: read the node's JSONL file (real: ``fedpeft.data`` loading + prompts).

    Raises:
        DataError: if the file is missing, empty or has a line that is not a JSON object.
    """
    path = Path(data_path)
    if not path.is_file():
        raise DataError(f"node data file {path} does not exist; set --node-config data-path=...")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: not valid JSON ({err})") from err
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path} has no examples")
    return rows


def placeholder_fit(global_state: State, examples: list[dict], client_id: str) -> ClientUpdate:
    """PLACEHOLDER for ``fedpeft.trainer.fit``: shift every tensor by mean(example["x"]).

    Args:
        global_state: The state received from the server.
        examples: The node's examples (each may carry a numeric ``"x"``; missing counts as 0).
        client_id: The node's stable client id (from its node config).

    Returns:
        The update, weighted by ``len(examples)``.
    """
    start = time.perf_counter()
    shift = sum(float(ex.get("x", 0.0)) for ex in examples) / len(examples)
    state = {k: v + shift for k, v in global_state.items()}
    metrics = {KEY_TRAIN_LOSS: shift * shift, KEY_STEPS: len(examples),
               KEY_SECONDS: time.perf_counter() - start}
    return ClientUpdate(client_id=client_id, state=state, num_examples=len(examples), metrics=metrics)
