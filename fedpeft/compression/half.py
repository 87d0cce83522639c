"""The ``fp16`` and ``bf16`` codecs: every value in 16 bits, half of fp32's bytes.

Bytes on the wire: ``2 * n`` for a tensor of ``n`` values (2 MB for 1M values, 2x smaller than fp32).

* ``fp16`` (IEEE half) keeps 11 significant bits (relative error <= 2**-11 for normal values)
  but only spans |x| <= 65504; encoding a larger value raises rather than sending inf. Values
  below 6.1e-5 are subnormal and lose relative precision (below 6e-8 they become 0).
* ``bf16`` keeps fp32's exponent range with 8 significant bits (relative error <= 2**-8).
  NumPy has no bfloat16 dtype, so its bit pattern travels as ``uint16``.

Rounding is to nearest, ties to even (PyTorch's cast).
"""

from __future__ import annotations

import numpy as np
import torch

from fedpeft.compression.base import (
    CODECS,
    PART_DATA,
    flat_fp32,
    from_numpy,
    take_parts,
    to_numpy,
)
from fedpeft.errors import AggregationError

FP16_MAX = torch.finfo(torch.float16).max  # 65504


@CODECS.register("fp16")
class Float16:
    """Sends IEEE half-precision values; has no hyperparameters."""

    lossless = False
    needs_error_feedback = False

    def encode(self, t: torch.Tensor) -> dict[str, np.ndarray]:
        """``{"data": t}`` flattened, as float16.

        Raises:
            AggregationError: if a finite value exceeds fp16's range (it would become inf).
        """
        x = flat_fp32(t)  # (n,)
        finite = x[torch.isfinite(x)].abs()
        if finite.numel() and finite.max() > FP16_MAX:
            raise AggregationError(f"max |value| {finite.max().item():.4g} is beyond fp16's range "
                                   f"(+-{FP16_MAX:g}) and would be sent as inf; use codec 'bf16', "
                                   "which keeps fp32's range")
        return {PART_DATA: to_numpy(x.to(torch.float16))}

    def decode(self, parts: dict[str, np.ndarray], shape: torch.Size) -> torch.Tensor:
        """The fp32 tensor of ``shape`` from ``parts["data"]``.

        Raises:
            AggregationError: if the part is missing, extra or has the wrong dtype or size.
        """
        data = take_parts(parts, {PART_DATA: (np.float16, shape.numel())})[PART_DATA]
        return from_numpy(data).to(torch.float32).reshape(shape)


@CODECS.register("bf16")
class BFloat16:
    """Sends bfloat16 values as their uint16 bit patterns; has no hyperparameters."""

    lossless = False
    needs_error_feedback = False

    def encode(self, t: torch.Tensor) -> dict[str, np.ndarray]:
        """``{"data": bits}``: the bfloat16 bit pattern of each value, as uint16."""
        bits = flat_fp32(t).to(torch.bfloat16).view(torch.int16)  # (n,)
        return {PART_DATA: to_numpy(bits).view(np.uint16)}

    def decode(self, parts: dict[str, np.ndarray], shape: torch.Size) -> torch.Tensor:
        """The fp32 tensor of ``shape`` from the bit patterns in ``parts["data"]``.

        Raises:
            AggregationError: if the part is missing, extra or has the wrong dtype or size.
        """
        data = take_parts(parts, {PART_DATA: (np.uint16, shape.numel())})[PART_DATA]
        return from_numpy(data.view(np.int16)).view(torch.bfloat16).to(torch.float32).reshape(shape)
