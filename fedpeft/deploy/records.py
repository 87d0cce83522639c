"""Conversion between fedpeft's ``State`` (``dict[str, Tensor]``) and Flower records; sizes.

torch is imported only by the conversions, so the ServerApp can talk to sites while it is
still importing the model code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

if TYPE_CHECKING:
    from fedpeft.state import State


def state_to_record(state: State) -> ArrayRecord:
    """Pack a state as an ``ArrayRecord`` of float32 NumPy arrays, keys and order kept.

    Args:
        state: Tensors by name (any dtype/device; converted to float32 CPU).

    Returns:
        The record; each ``Array`` carries dtype and shape, so no side channel is needed.
    """
    import torch

    return ArrayRecord(
        {k: Array(v.detach().to("cpu", torch.float32).contiguous().numpy()) for k, v in state.items()}
    )


def arrays_to_record(arrays: dict) -> ArrayRecord:
    """Pack a codec's payload (NumPy arrays of any dtype, ``fedpeft.compression``) as is."""
    import numpy as np

    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_to_state(record: ArrayRecord) -> State:
    """Unpack an ``ArrayRecord`` written by :func:`state_to_record` (float32 CPU tensors)."""
    import torch

    return {k: torch.from_numpy(arr.numpy().copy()).to(torch.float32) for k, arr in record.items()}


def content_nbytes(content: RecordDict) -> int:
    """Payload bytes of every record in ``content`` (arrays, configs, metrics).

    Flower serialises each ``Array`` as ``.npy`` bytes (a ~128-byte header per tensor), cut into
    5 MiB content-addressed chunks; protobuf and HTTP framing add a few hundred bytes per message.
    """
    arrays = sum(rec.count_bytes() for rec in content.array_records.values())
    metrics = sum(rec.count_bytes() for rec in content.metric_records.values())
    configs = sum(_config_nbytes(rec) for rec in content.config_records.values())
    return arrays + metrics + configs


def _config_nbytes(record: ConfigRecord) -> int:
    """``ConfigRecord.count_bytes`` without its failures on empty strings and lists (flwr 1.42)."""
    def size(value: object) -> int:
        if isinstance(value, (str, bytes)):
            return len(value)
        if isinstance(value, list):
            return sum(size(v) for v in value)
        return 1 if isinstance(value, bool) else 8  # protobuf int64 / double
    return sum(len(k) + size(v) for k, v in record.items())


def message_nbytes(message: Message) -> int:
    """Payload bytes of a message (0 for an error reply)."""
    return content_nbytes(message.content) if message.has_content() else 0
