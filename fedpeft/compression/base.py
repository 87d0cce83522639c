"""Shared pieces of every codec: the registry, the :class:`Codec` interface, part names and checks.

A codec turns one fp32 tensor into a few named NumPy arrays ("parts") and back. The receiver
knows the tensor's shape (it holds the same adapter), so shapes never travel. Decoding must
never yield a silently wrong tensor: every part a codec reads goes through :func:`take_parts`,
which checks the part names, dtypes and sizes against what the shape implies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from fedpeft.errors import AggregationError, ConfigError
from fedpeft.registry import Registry

CODECS: Registry[type] = Registry("codecs")
"""Codec classes by name (``none``, ``fp16``, ``bf16``, ``int8``, ``nf4``, ``topk``)."""

# Wire names of the parts; a payload key is f"{tensor_name}{PART_SEP}{part}".
PART_SEP = "/"
PART_DATA = "data"  # dense values (none, fp16, bf16)
PART_Q = "q"  # quantised codes (int8, nf4)
PART_ABSMAX = "absmax"  # per-block scale (int8, nf4)
PART_IDX = "idx"  # flat indices of the kept entries (topk)
PART_VAL = "val"  # their values (topk)


@runtime_checkable
class Codec(Protocol):
    """What the round loop needs from an update codec.

    Attributes:
        lossless: ``decode(encode(t))`` equals ``t`` bit for bit.
        needs_error_feedback: The codec drops most of the update, so it only converges when
            the sender keeps what was not sent (:class:`fedpeft.compression.ErrorFeedback`).
    """

    lossless: bool
    needs_error_feedback: bool

    def encode(self, t: torch.Tensor) -> dict[str, np.ndarray]:
        """Parts of ``t`` (any shape, fp32) by part name."""
        ...

    def decode(self, parts: dict[str, np.ndarray], shape: torch.Size) -> torch.Tensor:
        """The fp32 CPU tensor of ``shape`` that ``parts`` encode.

        Raises:
            AggregationError: if the parts do not fit ``shape`` (missing, extra, wrong size/dtype).
        """
        ...


def flat_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous 1-D fp32 CPU tensor."""
    return t.detach().to("cpu", torch.float32).reshape(-1)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy copy of ``t``: the payload must not alias (or keep alive) the sender's tensors."""
    return t.detach().cpu().contiguous().numpy().copy()


def from_numpy(a: np.ndarray) -> torch.Tensor:
    """A torch copy of ``a`` (wire arrays may be read-only buffers)."""
    return torch.from_numpy(np.array(a, copy=True))


def take_parts(parts: Mapping[str, np.ndarray], spec: Mapping[str, tuple[type, int]]) -> dict[str, np.ndarray]:
    """Check that ``parts`` has exactly ``spec``'s parts, each of its dtype and number of values.

    Args:
        parts: The received parts of one tensor.
        spec: ``{part: (numpy dtype, number of values)}`` that the receiver's shape implies.

    Returns:
        The parts, flattened to 1-D (not copied).

    Raises:
        AggregationError: naming the missing or extra parts, or the part whose dtype or size differs.
    """
    missing, extra = sorted(set(spec) - set(parts)), sorted(set(parts) - set(spec))
    if missing or extra:
        raise AggregationError(f"expected parts {sorted(spec)}, got {sorted(parts)} (missing {missing}, "
                               f"unexpected {extra}); do sender and receiver use the same codec?")
    out = {}
    for name, (dtype, size) in spec.items():
        a = parts[name]
        if not isinstance(a, np.ndarray):
            raise AggregationError(f"part {name!r} is a {type(a).__name__}, expected a numpy array")
        if a.dtype != np.dtype(dtype) or a.size != size:
            raise AggregationError(f"part {name!r} has {a.size} values of {a.dtype}, expected {size} of "
                                   f"{np.dtype(dtype)}; do sender and receiver use the same codec settings "
                                   "and adapter?")
        out[name] = a.reshape(-1)
    return out


def require_block_size(block_size: int) -> None:
    """Check that ``block_size`` is a positive even integer.

    Raises:
        ConfigError: e.g. "`block_size` must be a positive multiple of 2, got 3".
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0 or block_size % 2:
        raise ConfigError(f"`block_size` must be a positive multiple of 2, got {block_size!r}")


def require_fraction(fraction: float) -> None:
    """Check ``0 < fraction <= 1``.

    Raises:
        ConfigError: e.g. "`fraction` must be in (0, 1], got 0".
    """
    if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise ConfigError(f"`fraction` must be in (0, 1] (the share of entries sent), got {fraction:g}")
