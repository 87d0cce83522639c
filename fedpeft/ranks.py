"""Heterogeneous LoRA ranks: a client of rank r trains the first r components of the global adapter.

``federation.client_ranks`` gives each client (each site, in a deployment) its LoRA rank, at
most ``peft.r``, the global adapter's rank. The server sends a client of rank r only the first r
rows of every A (``r x in``) and columns of every B (``out x r``); the client loads them into its
``peft.r`` adapter with the other components zero, which stay zero while it trains (their
gradients are zero while both factors' parts are zero), and sends back only its r components;
the server pads them with zeros to the global shapes before aggregating. Every client's LoRA
scale is therefore ``alpha / peft.r``, as in HetLoRA (Cho et al., "Heterogeneous LoRA for
Federated Fine-tuning of On-Device Foundation Models", EMNLP 2024,
https://arxiv.org/abs/2401.06432): a rank-r client's product has the scale of everyone else's.

With ``fedavg`` (or any rule on the mean) this is HetLoRA's zero-padding baseline: components
beyond a client's rank are averaged with its zeros. With ``svd`` the global factors come out
ordered by singular value, so the first r components a client receives are the best rank-r
approximation of the mean product (FlexLoRA's redistribution). Only the bytes on the wire and
the client's effective rank shrink: a client still holds a ``peft.r`` adapter in memory.
"""

from __future__ import annotations

import torch

from fedpeft.state import State

LORA_A, LORA_B = ".lora_A.", ".lora_B."


def truncate(state: State, rank: int | None) -> State:
    """The first ``rank`` components of every LoRA factor; other tensors as they are."""
    if rank is None:
        return state
    return {k: v[:rank] if LORA_A in k else v[:, :rank] if LORA_B in k else v for k, v in state.items()}


def truncated_shapes(shapes: dict[str, torch.Size], rank: int | None) -> dict[str, torch.Size]:
    """The shapes :func:`truncate` gives for tensors of ``shapes``."""
    if rank is None:
        return dict(shapes)
    out = {}
    for k, s in shapes.items():
        if LORA_A in k:
            s = torch.Size((min(rank, s[0]), *s[1:]))
        elif LORA_B in k:
            s = torch.Size((s[0], min(rank, s[1]), *s[2:]))
        out[k] = s
    return out


def pad(state: State, shapes: dict[str, torch.Size]) -> State:
    """``state`` zero-padded to ``shapes`` (the global adapter's); the inverse of :func:`truncate`."""
    out = {}
    for k, v in state.items():
        if v.shape == shapes[k]:
            out[k] = v
            continue
        full = torch.zeros(shapes[k], dtype=v.dtype)
        full[tuple(slice(0, n) for n in v.shape)] = v
        out[k] = full
    return out


def client_rank(ranks: list[int | None] | None, index: int) -> int | None:
    """Client ``index``'s rank from ``federation.client_ranks`` (None: the global rank)."""
    return None if ranks is None else ranks[index]
