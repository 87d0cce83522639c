"""The ``topk`` codec: only the largest-magnitude entries of each tensor (sparsification).

Aji and Heafield, "Sparse Communication for Distributed Gradient Descent", EMNLP 2017.
https://arxiv.org/abs/1704.05021 -- it drops most of each update, so the sender must keep what
it did not send and add it to the next update (:class:`fedpeft.compression.ErrorFeedback`;
Stich, Cordonnier and Jaggi, "Sparsified SGD with Memory", NeurIPS 2018,
https://arxiv.org/abs/1809.07599).

Each tensor of ``n`` values keeps ``k = max(1, round(fraction * n))`` entries (``k = n`` at most):
part ``idx`` their flat indices (int32, ascending), part ``val`` their values (float32).
Entries of equal magnitude at the cut are taken lowest index first, so the same input always
gives the same bytes. A NaN counts as the largest magnitude, so it is always sent (and the
server's update screening drops the update).

Bytes on the wire: ``8 * k``; with the default fraction 0.1, 1M values take 0.8 MB (5x smaller
than fp32). Sparsity pays only for ``fraction < 0.5``: at 0.5 it costs as much as fp32.
"""

from __future__ import annotations

import numpy as np
import torch

from fedpeft.compression.base import (
    CODECS,
    PART_IDX,
    PART_VAL,
    flat_fp32,
    from_numpy,
    require_fraction,
    take_parts,
    to_numpy,
)
from fedpeft.errors import AggregationError

INT32_MAX = 2**31 - 1


@CODECS.register("topk")
class TopK:
    """Sends the ``fraction`` of each tensor's entries with the largest magnitude.

    Args:
        fraction: Share of each tensor's entries sent, in (0, 1]; at least one entry is sent.

    Raises:
        ConfigError: if ``fraction`` is not in (0, 1].
    """

    lossless = False
    needs_error_feedback = True

    def __init__(self, fraction: float = 0.1) -> None:
        require_fraction(fraction)
        self.fraction = float(fraction)

    def num_kept(self, n: int) -> int:
        """How many of ``n`` entries are sent: ``max(1, round(fraction * n))``, at most ``n``."""
        return min(n, max(1, round(self.fraction * n)))

    def encode(self, t: torch.Tensor) -> dict[str, np.ndarray]:
        """``{"idx": int32 ascending (k,), "val": float32 (k,)}``.

        Raises:
            AggregationError: if the tensor has more entries than int32 indices can address.
        """
        x = flat_fp32(t)  # (n,)
        if x.numel() > INT32_MAX:
            raise AggregationError(f"{x.numel()} entries do not fit int32 indices; split the tensor")
        idx = self._top_indices(x)  # (k,)
        return {PART_IDX: to_numpy(idx.to(torch.int32)), PART_VAL: to_numpy(x[idx])}

    def _top_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Ascending indices of the ``k`` largest |x|, ties at the cut broken by lowest index."""
        k = self.num_kept(x.numel())
        if k == 0:
            return torch.zeros(0, dtype=torch.int64)
        mag = torch.nan_to_num(x.abs(), nan=float("inf"))  # (n,)
        cut = torch.topk(mag, k, sorted=False).values.min()  # the k-th largest magnitude
        above = torch.nonzero(mag > cut).reshape(-1)
        at_cut = torch.nonzero(mag == cut).reshape(-1)[: k - above.numel()]  # ascending order
        return torch.cat([above, at_cut]).sort().values

    def decode(self, parts: dict[str, np.ndarray], shape: torch.Size) -> torch.Tensor:
        """The fp32 tensor of ``shape``: the sent values at their indices, zeros elsewhere.

        Raises:
            AggregationError: if a part is missing, extra or has the wrong dtype or size, or the
                indices are out of range, repeated or not ascending.
        """
        n = shape.numel()
        k = self.num_kept(n)
        got = take_parts(parts, {PART_IDX: (np.int32, k), PART_VAL: (np.float32, k)})
        idx = from_numpy(got[PART_IDX]).to(torch.int64)  # (k,)
        _check_indices(idx, n)
        out = torch.zeros(n, dtype=torch.float32)
        out[idx] = from_numpy(got[PART_VAL])
        return out.reshape(shape)


def _check_indices(idx: torch.Tensor, n: int) -> None:
    """Refuse indices a correct sender never produces: repeats would overwrite, others misplace."""
    if (idx[1:] <= idx[:-1]).any():
        raise AggregationError(f"part {PART_IDX!r} must hold strictly ascending indices (no repeats)")
    if idx.numel() and (idx[0] < 0 or idx[-1] >= n):
        raise AggregationError(f"part {PART_IDX!r} has indices from {int(idx[0])} to {int(idx[-1])}, "
                               f"outside [0, {n}) for this tensor")
