"""Move trainable adapter parameters in and out of a model as plain ``State`` dicts.

This is what travels between server and clients: every parameter with ``requires_grad`` (for
P-Tuning that includes the prompt encoder), as fp32 CPU tensors. Swapping a client's state in is
an in-place copy: the base model is never reloaded or copied.
"""

from __future__ import annotations

import torch
from torch import nn

from fedpeft.errors import AggregationError
from fedpeft.types import State


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
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise AggregationError(
            f"adapter state does not fit the model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}; was it made with the same "
            "model and peft settings?"
        )
    for name, p in params.items():
        if p.shape != state[name].shape:
            raise AggregationError(f"{name}: shape {tuple(state[name].shape)} != model's {tuple(p.shape)}")
        p.copy_(state[name])


def state_nbytes(state: State, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of ``state`` on the wire (fp32 by default)."""
    return sum(t.numel() for t in state.values()) * torch.tensor([], dtype=dtype).element_size()


def num_parameters(state: State) -> int:
    """Number of scalars in ``state``."""
    return sum(t.numel() for t in state.values())
