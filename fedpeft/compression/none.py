"""The ``none`` codec: fp32 values as they are (lossless), the baseline of every byte count.

Bytes on the wire: ``4 * n`` for a tensor of ``n`` values (4 MB for 1M values).
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


@CODECS.register("none")
class NoCompression:
    """Sends every value in fp32; has no hyperparameters."""

    lossless = True
    needs_error_feedback = False

    def encode(self, t: torch.Tensor) -> dict[str, np.ndarray]:
        """``{"data": t}`` flattened, as float32."""
        return {PART_DATA: to_numpy(flat_fp32(t))}

    def decode(self, parts: dict[str, np.ndarray], shape: torch.Size) -> torch.Tensor:
        """The tensor of ``shape`` from ``parts["data"]``.

        Raises:
            AggregationError: if the part is missing, extra or has the wrong dtype or size.
        """
        data = take_parts(parts, {PART_DATA: (np.float32, shape.numel())})[PART_DATA]
        return from_numpy(data).reshape(shape)
