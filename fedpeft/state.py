"""Plain data types shared by the core and every runtime (no Flower, no threads): the adapter
state, a client's update, and what one round of a client pool returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

State = dict[str, torch.Tensor]
"""Trainable adapter parameters by name: fp32, on CPU, detached."""


def state_mismatch(reference: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str | None:
    """How ``state``'s keys or shapes differ from ``reference``'s, or None when they agree.

    The one check behind aggregation, update screening and loading a state into a model.
    """
    missing, extra = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
    if missing or extra:
        return f"missing {_few(missing)}, unexpected {_few(extra)}"
    for key, ref in reference.items():
        if state[key].shape != ref.shape:
            return f"tensor {key!r} has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}"
    return None


def _few(keys: list[str], shown: int = 3) -> str:
    return f"{keys[:shown]}{'...' if len(keys) > shown else ''}"


@dataclass
class ClientUpdate:
    """What one client sends back after local training.

    Attributes:
        client_id: Stable id of the client (e.g. ``"client-0"`` or a site name).
        state: The client's trainable parameters after local training.
        num_examples: Number of training examples the client used (FedAvg weight).
        metrics: Scalar training metrics (``train_loss``, ``seconds``, ``steps``, ...).
    """

    client_id: str
    state: State
    num_examples: int
    metrics: dict[str, float | int | str] = field(default_factory=dict)


@dataclass
class ClientReport:
    """What the server learnt about one client that trained in a round (never its data)."""

    client_id: str
    num_examples: int
    metrics: dict[str, float | int | str] = field(default_factory=dict)
    bytes_down: int = 0  # bytes sent to the client this round
    bytes_up: int = 0  # bytes received from it


@dataclass
class RoundResult:
    """What a client pool returns for one round; ``updates`` (plain) or ``mean`` (secure
    aggregation: only the sample-weighted mean of the updates is known), never both.

    Attributes:
        reports: The clients that trained, in sampled order.
        updates: Their updates, in the same order (plain aggregation).
        mean: Their sample-weighted mean (secure aggregation).
        dropped: ``{"client": id, "reason": why}`` for every sampled client that did not train.
        secure: Whether the mean came from secure aggregation.
    """

    reports: list[ClientReport]
    updates: list[ClientUpdate] | None = None
    mean: State | None = None
    dropped: list[dict[str, str]] = field(default_factory=list)
    secure: bool = False
