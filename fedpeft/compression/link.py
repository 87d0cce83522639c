"""A job's compression, both directions, as both ends of the wire apply it (pool-agnostic).

The server sends the global adapter encoded with ``federation.compression.down``
(:meth:`Link.send_global`; the simulation's clients train from exactly what a site would
decode). A client sends its update with ``up``: a lossless codec sends the trained state itself;
a lossy one sends the *delta* from the state it started from (small numbers quantise better),
through the client's :class:`~fedpeft.compression.ErrorFeedback` when the codec needs one
(top-k). The server rebuilds the update as its own exact global state plus the decoded delta
(:meth:`Link.receive_update`), so the downlink's rounding does not accumulate in the global
adapter. The simulation's pool and the Flower site and transport call these same functions;
bytes reported per round are the payloads' bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedpeft.compression import Codec, ErrorFeedback, build_codec, decode_state, encode_state
from fedpeft.config import CompressionConfig
from fedpeft.state import State

Arrays = dict[str, np.ndarray]


@dataclass
class Link:
    """The codecs of one job: ``down`` for the global adapter, ``up`` for client updates."""

    down: Codec
    up: Codec

    @classmethod
    def from_config(cls, cfg: CompressionConfig) -> Link:
        """The link ``federation.compression`` describes."""
        return cls(build_codec(cfg.down.name, cfg.down.params), build_codec(cfg.up.name, cfg.up.params))

    @property
    def plain(self) -> bool:
        """fp32 both ways: nothing to encode."""
        return bool(self.down.lossless and self.up.lossless and not self.up.needs_error_feedback)

    def send_global(self, state: State) -> tuple[Arrays, State]:
        """Server: the payload for the clients, and the state they will decode from it."""
        arrays = encode_state(self.down, state)
        return arrays, decode_state(self.down, arrays, _shapes(state))

    def receive_global(self, arrays: Arrays, shapes: dict[str, torch.Size]) -> State:
        """Client: the global adapter from the server's payload (checked against ``shapes``)."""
        return decode_state(self.down, arrays, shapes)

    def send_update(self, start: State, trained: State, feedback: ErrorFeedback | None) -> Arrays:
        """Client: the payload of its update (``trained``, after starting from ``start``)."""
        if self.up.lossless and not self.up.needs_error_feedback:
            return encode_state(self.up, trained)
        delta = {k: (trained[k].double() - start[k].double()).to(torch.float32) for k in start}
        if self.up.needs_error_feedback:
            return (feedback or ErrorFeedback()).compress(self.up, delta)[0]
        return encode_state(self.up, delta)

    def receive_update(self, arrays: Arrays, global_state: State) -> State:
        """Server: the client's state, rebuilt on the server's exact ``global_state``."""
        decoded = decode_state(self.up, arrays, _shapes(global_state))
        if self.up.lossless and not self.up.needs_error_feedback:
            return decoded
        return {k: (global_state[k].double() + decoded[k].double()).to(torch.float32) for k in global_state}


def _shapes(state: State) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in state.items()}
