"""A job's compression, both directions, as both ends of the wire apply it (pool-agnostic).

The server sends the global adapter encoded with ``federation.compression.down``
(:meth:`Link.send_global`; the simulation's clients train from exactly what a site would
decode). A client sends its update with ``up``: a lossless codec sends the trained state itself;
a lossy one sends the *delta* from the state it started from (small numbers quantise better),
through the client's :class:`~fedpeft.compression.ErrorFeedback` when the codec needs one
(top-k). The server rebuilds the update as its own exact global state plus the decoded delta
(:meth:`Link.receive_update`), so the downlink's rounding does not accumulate in the global
adapter. The simulation's pool and the Flower site and transport call these same functions;
bytes reported per round are the payloads' bytes. With heterogeneous ranks (:mod:`fedpeft.ranks`)
a client is sent, and sends back, only its rank's components (:meth:`Link.broadcast`,
:meth:`Link.client_start`, :meth:`Link.client_reply`, :meth:`Link.rebuild`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedpeft.adapters import state_nbytes
from fedpeft.compression import Codec, ErrorFeedback, build_codec, decode_state, encode_state, payload_nbytes
from fedpeft.config import CompressionConfig
from fedpeft.errors import AggregationError
from fedpeft.ranks import pad, truncate, truncated_shapes
from fedpeft.state import State, state_mismatch

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


    def broadcast(self, state: State, rank: int | None) -> Broadcast:
        """Server: what a client of ``rank`` (None: the whole adapter) is sent (:mod:`fedpeft.ranks`)."""
        view = truncate(state, rank)
        if self.plain:
            return Broadcast(rank, None, view, state_nbytes(view))
        arrays, sent = self.send_global(view)
        return Broadcast(rank, arrays, sent, payload_nbytes(arrays))

    def client_start(self, arrays: Arrays, shapes: dict[str, torch.Size], rank: int | None) -> tuple[State, State]:
        """Client: ``(received, start)``: what the server sent (its rank's components), and the
        whole-adapter state to train from (the other components zero)."""
        view_shapes = truncated_shapes(shapes, rank)
        if self.plain:
            received = {k: torch.from_numpy(np.array(arrays[k], dtype=np.float32)) for k in arrays}
            check_shapes(received, view_shapes)
        else:
            received = self.receive_global(arrays, view_shapes)
        return received, pad(received, shapes)

    def client_reply(self, received: State, trained: State, rank: int | None,
                     feedback: ErrorFeedback | None) -> Arrays:
        """Client: the payload of its update (its rank's components only)."""
        view = truncate(trained, rank)
        if self.plain:
            return {k: v.detach().numpy() for k, v in view.items()}
        return self.send_update(received, view, feedback)

    def rebuild(self, arrays: Arrays, global_state: State, rank: int | None) -> State:
        """Server: a client's update at the global adapter's shapes (padded with zeros)."""
        view = truncate(global_state, rank)
        if self.plain:
            got = {k: torch.from_numpy(np.array(arrays[k], dtype=np.float32)) for k in arrays}
            check_shapes(got, _shapes(view))
        else:
            got = self.receive_update(arrays, view)
        return pad(got, _shapes(global_state))


@dataclass
class Broadcast:
    """What the server sends the clients of one rank this round.

    Attributes:
        rank: The clients' rank (None: the whole adapter).
        payload: The codec's arrays (None when fp32 is sent as is: ``start`` itself).
        start: What the clients decode: their rank's components of the global adapter.
        nbytes: Bytes on the wire per client.
    """

    rank: int | None
    payload: Arrays | None
    start: State
    nbytes: int


def check_shapes(state: State, shapes: dict[str, torch.Size]) -> None:
    """Raise :class:`AggregationError` unless ``state`` has exactly ``shapes``' keys and shapes."""
    problem = state_mismatch({k: torch.empty(s, device="meta") for k, s in shapes.items()}, state)
    if problem is not None:
        raise AggregationError(f"the payload does not fit the adapter: {problem}")


def _shapes(state: State) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in state.items()}
