"""A whole state on the wire: one flat ``{f"{tensor}/{part}": array}`` mapping, as a Flower
``ArrayRecord`` carries it, and back.

The receiver decodes against the shapes of its own adapter, so a payload that does not fit
(a missing or extra tensor or part, a wrong size or dtype) raises :class:`AggregationError`
naming the tensor instead of producing a silently wrong one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fedpeft.compression.base import PART_SEP, Codec
from fedpeft.errors import AggregationError
from fedpeft.state import State


def encode_state(codec: Codec, state: State) -> dict[str, np.ndarray]:
    """Encode every tensor of ``state`` with ``codec``.

    Args:
        codec: The codec.
        state: Tensors by name (fp32; any device).

    Returns:
        ``{f"{tensor_name}/{part}": array}``, tensors in ``state``'s order.

    Raises:
        AggregationError: if the codec refuses a tensor (e.g. fp16 out of range), naming it.
    """
    arrays: dict[str, np.ndarray] = {}
    for name, tensor in state.items():
        try:
            parts = codec.encode(tensor)
        except AggregationError as e:
            raise AggregationError(f"cannot encode tensor {name!r}: {e}") from None
        arrays.update({f"{name}{PART_SEP}{part}": array for part, array in parts.items()})
    return arrays


def decode_state(codec: Codec, arrays: Mapping[str, np.ndarray], shapes: Mapping[str, Sequence[int]]) -> State:
    """Decode a payload of :func:`encode_state` into fp32 CPU tensors of the expected shapes.

    Args:
        codec: The codec the sender used.
        arrays: The payload, ``{f"{tensor_name}/{part}": array}``.
        shapes: The shape of every tensor the payload must hold (the receiver's own adapter).

    Returns:
        The state, in ``shapes``' order.

    Raises:
        AggregationError: naming the tensor whose parts are missing, unexpected, or of the wrong
            dtype or size, or the payload keys that belong to no expected tensor.
    """
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, array in arrays.items():
        name, sep, part = key.rpartition(PART_SEP)
        grouped.setdefault(name if sep else key, {})[part if sep else ""] = array
    extra = [name for name in grouped if name not in shapes]
    if extra:
        raise AggregationError(f"the payload holds tensor(s) the receiver's adapter does not have: {extra[:3]}"
                               f"{'...' if len(extra) > 3 else ''} (keys must be '<tensor>{PART_SEP}<part>' for "
                               "one of its tensors); do both sides use the same adapter?")
    state: State = {}
    for name, shape in shapes.items():
        if name not in grouped:
            raise AggregationError(f"tensor {name!r} is missing from the payload; do both sides use the same adapter?")
        try:
            tensor = codec.decode(grouped[name], torch.Size(shape))
        except AggregationError as e:
            raise AggregationError(f"tensor {name!r}: {e}") from None
        if tensor.shape != torch.Size(shape) or tensor.dtype != torch.float32:
            raise AggregationError(f"tensor {name!r}: the codec decoded a {tensor.dtype} tensor of shape "
                                   f"{tuple(tensor.shape)}, expected float32 of shape {tuple(shape)}")
        state[name] = tensor.cpu()
    return state


def payload_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of the arrays' data (what the codec saves; record framing not counted)."""
    return sum(int(a.nbytes) for a in arrays.values())
