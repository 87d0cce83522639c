"""Client-level DP: DP-FedAvg (McMahan et al. 2018, arXiv:1710.06963), done on each client.

Each sampled client clips its update's delta ``new - global`` to L2 norm ``clip_norm`` (over all
adapter tensors together) and adds its *share* of the Gaussian noise: std
``noise_multiplier * clip_norm / sqrt(shares)``, where ``shares`` is the number of clients
sampled in the round. The sum of ``shares`` such updates then carries noise of std
``noise_multiplier * clip_norm``, the Gaussian mechanism on a sum whose sensitivity to one
client is ``clip_norm``. Updates are averaged with equal weights (a weight by example count
would change the sensitivity), so each client reports a weight of 1.

Because every client adds its share itself, secure aggregation (SecAgg+) shows the server only
the noisy sum. Without it the server sees each update with only ``1/sqrt(shares)`` of the noise:
the guarantee then holds against everyone who sees the global adapter (the sites, anyone it is
published to), not against the coordinator. If a client drops out, the sum carries less noise;
:mod:`fedpeft.privacy.ledger` accounts for the noise actually added.

The noise is drawn from a generator seeded by the client's round seed; a deployed site mixes
in a secret key of its own (:func:`private_seed`), so the coordinator, which chose the seed,
cannot recompute and subtract the noise.
"""

from __future__ import annotations

import hashlib
import math

import torch

from fedpeft.config import PrivacyConfig
from fedpeft.state import State

KEY_UPDATE_NORM = "dp_update_norm"  # L2 norm of the delta before clipping (not covered by DP)
KEY_CLIPPED = "dp_clipped"  # 1 if the delta was clipped (an int: Flower metrics take no bools)
KEY_SHARES = "dp_shares"


def share_std(noise_multiplier: float, clip_norm: float, shares: int) -> float:
    """Std of one client's noise so that ``shares`` clients' noise sums to ``noise_multiplier * clip_norm``."""
    return noise_multiplier * clip_norm / math.sqrt(max(shares, 1))


def delta_norm(new: State, old: State) -> float:
    """L2 norm of ``new - old`` over every tensor together."""
    return math.sqrt(sum(float(((new[k].float() - old[k].float()) ** 2).sum()) for k in old))


def clip_and_noise(new: State, old: State, clip_norm: float, noise_std: float,
                   generator: torch.Generator) -> tuple[State, float]:
    """``old + clip(new - old) + N(0, noise_std^2)`` per value; also the delta's norm before clipping."""
    norm = delta_norm(new, old)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    out = {}
    for k in sorted(old):  # a fixed order: the same seed draws the same noise for every tensor
        delta = (new[k].float() - old[k].float()) * scale
        noise = torch.randn(delta.shape, generator=generator, dtype=torch.float32) * noise_std
        out[k] = (old[k].float() + delta + noise).to(old[k].dtype)
    return out, norm


def release(new: State, old: State, privacy: PrivacyConfig, shares: int, seed: int) -> tuple[State, dict]:
    """The update a client sends under client-level DP, and its DP metrics."""
    generator = torch.Generator().manual_seed(seed)
    std = share_std(privacy.noise_multiplier or 0.0, privacy.clip_norm, shares)
    state, norm = clip_and_noise(new, old, privacy.clip_norm, std, generator)
    return state, {KEY_UPDATE_NORM: round(norm, 6), KEY_CLIPPED: int(norm > privacy.clip_norm), KEY_SHARES: shares}


def private_seed(seed: int, key: bytes) -> int:
    """A seed the coordinator cannot know: ``seed`` mixed with the site's secret ``key``."""
    return int.from_bytes(hashlib.sha256(key + seed.to_bytes(16, "little", signed=True)).digest()[:8], "little")
