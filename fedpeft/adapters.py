"""The adapter: its trainable parameters in and out of a model as plain ``State`` dicts, and its folder.

This is what travels between server and clients: every parameter with ``requires_grad`` (for
P-Tuning that includes the prompt encoder), as fp32 CPU tensors. Swapping a client's state in is
an in-place copy: the base model is never reloaded or copied.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from fedpeft.config import JobConfig, ModelConfig
from fedpeft.errors import AggregationError
from fedpeft.io_utils import atomic_path
from fedpeft.state import State, state_mismatch

MODEL_INFO_FILE = "fedpeft_model.json"


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's trainable parameters by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def get_trainable_state(model: nn.Module) -> State:
    """Copy the trainable parameters out as fp32 CPU tensors."""
    return {n: p.detach().to("cpu", torch.float32).clone() for n, p in trainable_parameters(model).items()}


@torch.no_grad()
def set_trainable_state(model: nn.Module, state: State) -> None:
    """Copy ``state`` into the model's trainable parameters in place.

    Raises:
        AggregationError: if the keys or shapes do not match the model's adapter.
    """
    params = trainable_parameters(model)
    problem = state_mismatch(params, state)
    if problem is not None:
        raise AggregationError(f"adapter state does not fit the model: {problem}; was it made with the same "
                               "model and peft settings?")
    for name, p in params.items():
        p.copy_(state[name])


def state_nbytes(state: State, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of ``state`` on the wire (fp32 by default)."""
    return sum(t.numel() for t in state.values()) * torch.tensor([], dtype=dtype).element_size()


def num_parameters(state: State) -> int:
    """Number of scalars in ``state``."""
    return sum(t.numel() for t in state.values())

def save_adapter(model: PeftModel, state: State, out: Path, cfg: JobConfig) -> None:
    """Write ``state`` as a PEFT adapter folder (plus the base model's fedpeft config)."""
    set_trainable_state(model, state)
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        info = {"model": cfg.model.model_dump(mode="json"), "peft": {"method": cfg.peft.method, **cfg.peft.params},
                "prompt_template": cfg.data.prompt_template}
        (tmp / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2))


def load_adapter(adapter_dir: str | Path, device: str = "cpu") -> tuple[PeftModel, object]:
    """Load the base model named in ``adapter_dir`` with the adapter on top (inference mode)."""
    adapter_dir = Path(adapter_dir)
    info_file = adapter_dir / MODEL_INFO_FILE
    if not info_file.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a fedpeft adapter folder (no {MODEL_INFO_FILE})")
    info = json.loads(info_file.read_text())
    from fedpeft.models import load_base_model

    base, tok = load_base_model(ModelConfig(**info["model"]), device)
    if info.get("prompt_template"):  # the layout the adapter was trained with
        from fedpeft.data.prompts import chat_template_from

        tok.chat_template = chat_template_from(info["prompt_template"])
    return PeftModel.from_pretrained(base, adapter_dir), tok
