"""Conversion between fedpeft's ``State`` (``dict[str, Tensor]``) and Flower records."""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict

from fedpeft.types import State


def state_to_record(state: State) -> ArrayRecord:
    """Pack a state as an ``ArrayRecord`` of float32 NumPy arrays, keys and order kept.

    Args:
        state: Tensors by name (any dtype/device; converted to float32 CPU).

    Returns:
        The record; each ``Array`` carries dtype and shape, so no side channel is needed.
    """
    return ArrayRecord(
        {k: Array(v.detach().to("cpu", torch.float32).contiguous().numpy()) for k, v in state.items()}
    )


def record_to_state(record: ArrayRecord) -> State:
    """Unpack an ``ArrayRecord`` written by :func:`state_to_record` (float32 CPU tensors)."""
    return {k: torch.from_numpy(arr.numpy().copy()).to(torch.float32) for k, arr in record.items()}


def content_nbytes(content: RecordDict) -> int:
    """Payload bytes of every record in ``content`` (arrays, configs, metrics).

    Flower serialises each ``Array`` as ``.npy`` bytes (a ~128-byte header per tensor), cut into
    5 MiB content-addressed chunks; protobuf and HTTP framing add a few hundred bytes per message.
    """
    records = [*content.array_records.values(), *content.config_records.values(),
               *content.metric_records.values()]
    return sum(rec.count_bytes() for rec in records)


def message_nbytes(message: Message) -> int:
    """Payload bytes of a message (0 for an error reply)."""
    return content_nbytes(message.content) if message.has_content() else 0
