"""The ``int8`` and ``nf4`` codecs: blockwise absmax quantisation.

Dettmers, Lewis, Shleifer and Zettlemoyer, "8-bit Optimizers via Block-wise Quantization",
ICLR 2022. https://arxiv.org/abs/2110.02861 -- NF4 from Dettmers, Pagnoni, Holtzman and
Zettlemoyer, "QLoRA: Efficient Finetuning of Quantized LLMs", NeurIPS 2023.
https://arxiv.org/abs/2305.14314

The flattened tensor is cut into blocks of ``block_size`` values (the last one zero-padded;
the padding is not sent). Each block sends its absmax as fp32 (part ``absmax``) and each value
a code of ``x / absmax`` (part ``q``); an all-zero block has absmax 0 and decodes to zeros.

* ``int8``: ``q = round(x / absmax * 127)`` as int8 (ties to even), decoded as
  ``q / 127 * absmax``. Linear, unlike bitsandbytes' 8-bit "dynamic" code map.
* ``nf4``: ``q`` = index of the nearest of the 16 NF4 code values (QLoRA, appendix E; the
  table of bitsandbytes), a value exactly halfway going to the lower code, as bitsandbytes
  does. Two indices per byte, the FIRST value in the HIGH nibble (bitsandbytes' layout); an odd
  count pads the last low nibble with the code of 0. Same bytes as bitsandbytes 0.50.2's
  ``quantize_4bit(x, blocksize, quant_type="nf4")`` (checked in the tests when installed).

Bytes on the wire for ``n`` values and block size ``b``, with ``ceil(n / b)`` blocks:

* int8: ``n + 4 * ceil(n / b)``; with the default b = 256, 1M values take 1.016 MB (3.94x
  smaller than fp32; b = 64 would give 1.0625 MB, 3.76x).
* nf4: ``ceil(n / 2) + 4 * ceil(n / b)``; with the default b = 64, 1M values take 0.5625 MB
  (7.1x smaller than fp32).

Non-finite inputs: a block holding NaN or Inf decodes to NaN throughout, so the server's update
screening (:mod:`fedpeft.update_checks`) still sees and drops the update.

Why not bitsandbytes' kernels: bitsandbytes 0.50.2 (checked with torch 2.13.0+cpu) runs
``quantize_4bit`` and ``quantize_blockwise`` on CPU tensors, and its NF4 bytes equal these,
but it is not a dependency of fedpeft (a 43 MB wheel for what is ~20 lines of torch here),
and its 8-bit blockwise code is a nonlinear map, not the linear int8 above.
"""

from __future__ import annotations

import numpy as np
import torch

from fedpeft.compression.base import (
    CODECS,
    PART_ABSMAX,
    PART_Q,
    flat_fp32,
    from_numpy,
    require_block_size,
    take_parts,
    to_numpy,
)

# The 16 NF4 code values (QLoRA; bitsandbytes' table, sorted ascending, index 7 is 0).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2  # (15,) decision boundaries
NF4_ZERO = 7  # index of the code 0.0


def _num_blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def _scaled_blocks(t: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x / absmax per block, absmax)``: shapes ``(blocks, block_size)`` and ``(blocks,)``.

    An all-zero block has absmax 0 and scaled values 0; a non-finite value in a block makes its
    absmax non-finite and its scaled values 0 (so the codes are deterministic).
    """
    x = flat_fp32(t)  # (n,)
    pad = _num_blocks(x.numel(), block_size) * block_size - x.numel()
    blocks = torch.nn.functional.pad(x, (0, pad)).reshape(-1, block_size)  # (blocks, block_size)
    absmax = blocks.abs().amax(dim=1)  # (blocks,); NaN propagates
    usable = (absmax > 0) & torch.isfinite(absmax)
    scaled = blocks / torch.where(usable, absmax, torch.ones_like(absmax))[:, None]
    return torch.where(usable[:, None], scaled, torch.zeros_like(scaled)), absmax


def _rescale(unit: torch.Tensor, absmax: np.ndarray, block_size: int, shape: torch.Size) -> torch.Tensor:
    """Values in [-1, 1] (flat, ``n`` of them) times their block's absmax, as a tensor of ``shape``."""
    n = shape.numel()
    blocks = _num_blocks(n, block_size)
    unit = torch.nn.functional.pad(unit, (0, blocks * block_size - n)).reshape(blocks, block_size)
    return (unit * from_numpy(absmax)[:, None]).reshape(-1)[:n].reshape(shape)


@CODECS.register("int8")
class Int8Blockwise:
    """Linear 8-bit codes scaled by each block's absmax.

    Args:
        block_size: Values per block (a positive even number); smaller blocks follow outliers
            more closely but send more absmax bytes (4 per block).

    Raises:
        ConfigError: if ``block_size`` is not a positive multiple of 2.
    """

    lossless = False
    needs_error_feedback = False

    def __init__(self, block_size: int = 256) -> None:
        require_block_size(block_size)
        self.block_size = block_size

    def encode(self, t: torch.Tensor) -> dict[str, np.ndarray]:
        """``{"q": int8 codes (n,), "absmax": fp32 (blocks,)}``."""
        scaled, absmax = _scaled_blocks(t, self.block_size)
        q = torch.round(scaled * 127).to(torch.int8).reshape(-1)[: t.numel()]
        return {PART_Q: to_numpy(q), PART_ABSMAX: to_numpy(absmax)}

    def decode(self, parts: dict[str, np.ndarray], shape: torch.Size) -> torch.Tensor:
        """The fp32 tensor of ``shape`` from its codes and block absmax.

        Raises:
            AggregationError: if a part is missing, extra or has the wrong dtype or size.
        """
        n = shape.numel()
        got = take_parts(parts, {PART_Q: (np.int8, n), PART_ABSMAX: (np.float32, _num_blocks(n, self.block_size))})
        unit = from_numpy(got[PART_Q]).to(torch.float32) / 127
        return _rescale(unit, got[PART_ABSMAX], self.block_size, shape)


@CODECS.register("nf4")
class NF4Blockwise:
    """4-bit NormalFloat codes scaled by each block's absmax, two per byte.

    Args:
        block_size: Values per block (a positive even number); QLoRA and bitsandbytes use 64.

    Raises:
        ConfigError: if ``block_size`` is not a positive multiple of 2.
    """

    lossless = False
    needs_error_feedback = False

    def __init__(self, block_size: int = 64) -> None:
        require_block_size(block_size)
        self.block_size = block_size

    def encode(self, t: torch.Tensor) -> dict[str, np.ndarray]:
        """``{"q": packed uint8 (ceil(n/2),), "absmax": fp32 (blocks,)}``."""
        scaled, absmax = _scaled_blocks(t, self.block_size)
        idx = torch.bucketize(scaled.reshape(-1)[: t.numel()], NF4_MIDPOINTS).to(torch.uint8)  # (n,)
        if idx.numel() % 2:
            idx = torch.cat([idx, torch.tensor([NF4_ZERO], dtype=torch.uint8)])
        packed = (idx[0::2] << 4) | idx[1::2]  # first value in the high nibble
        return {PART_Q: to_numpy(packed), PART_ABSMAX: to_numpy(absmax)}

    def decode(self, parts: dict[str, np.ndarray], shape: torch.Size) -> torch.Tensor:
        """The fp32 tensor of ``shape`` from its packed codes and block absmax.

        Raises:
            AggregationError: if a part is missing, extra or has the wrong dtype or size.
        """
        n = shape.numel()
        got = take_parts(parts, {PART_Q: (np.uint8, -(-n // 2)),
                                 PART_ABSMAX: (np.float32, _num_blocks(n, self.block_size))})
        packed = from_numpy(got[PART_Q]).to(torch.int64)  # (ceil(n/2),)
        idx = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n]  # (n,), high nibble first
        return _rescale(NF4_CODE[idx], got[PART_ABSMAX], self.block_size, shape)
