"""Plain data types shared by the core and every runtime (no Flower, no threads)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

State = dict[str, torch.Tensor]
"""Trainable adapter parameters by name: fp32, on CPU, detached."""


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
