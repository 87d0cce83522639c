"""Error feedback: the sender keeps what a lossy codec did not deliver and adds it next time.

Seide, Fu, Droppo, Li and Yu, "1-Bit Stochastic Gradient Descent and its Application to
Data-Parallel Distributed Training of Speech DNNs", Interspeech 2014; Karimireddy, Rebjock,
Stich and Jaggi, "Error Feedback Fixes SignSGD and other Gradient Compression Schemes",
ICML 2019. https://arxiv.org/abs/1901.09847

Each call sends ``carry = delta + residual`` and keeps ``residual = carry - decoded(carry)``,
so over any number of rounds ``sum(decoded) + residual == sum(delta)``: nothing is lost, only
delayed. Top-k needs it to converge; it also removes the bias of the quantising codecs.
"""

from __future__ import annotations

import numpy as np
import torch

from fedpeft.compression.base import Codec
from fedpeft.compression.wire import decode_state, encode_state
from fedpeft.errors import AggregationError
from fedpeft.state import State, state_mismatch


class ErrorFeedback:
    """The residual of one sender (one client, or the server for its broadcast).

    The residual starts at zero, shaped like the first delta. A non-finite entry of the new
    residual is reset to 0, so one NaN update (which the server drops) does not poison every
    later round.
    """

    def __init__(self) -> None:
        self._residual: State | None = None

    @property
    def residual(self) -> State:
        """A copy of the residual (empty before the first :meth:`compress`)."""
        return self.state_dict()

    def compress(self, codec: Codec, delta: State) -> tuple[dict[str, np.ndarray], State]:
        """Encode ``delta`` plus the residual, and keep what the codec lost.

        Args:
            codec: The codec to send with.
            delta: The update to send (fp32 tensors by name; not modified).

        Returns:
            ``(arrays, decoded)``: the payload of :func:`encode_state` and what the receiver
            will decode from it.

        Raises:
            AggregationError: if ``delta``'s keys or shapes differ from the residual's, or the
                codec refuses a tensor (the residual is then unchanged).
        """
        carry = {k: v.detach().to("cpu", torch.float32) for k, v in delta.items()}
        if self._residual is not None:
            problem = state_mismatch(self._residual, carry)
            if problem is not None:
                raise AggregationError(f"the update does not match the error-feedback residual: {problem}; "
                                       "did the adapter change between rounds?")
            carry = {k: v + self._residual[k] for k, v in carry.items()}
        arrays = encode_state(codec, carry)
        decoded = decode_state(codec, arrays, {k: v.shape for k, v in carry.items()})
        self._residual = {k: torch.nan_to_num(v - decoded[k], nan=0.0, posinf=0.0, neginf=0.0)
                          for k, v in carry.items()}
        return arrays, decoded

    def state_dict(self) -> State:
        """The residual as plain tensors (copies), for checkpoints; ``{}`` before the first call."""
        return {k: v.clone() for k, v in (self._residual or {}).items()}

    def load_state_dict(self, state: State) -> None:
        """Restore what :meth:`state_dict` returned (``{}`` restarts from zero)."""
        self._residual = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in state.items()} or None
