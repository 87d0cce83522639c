"""The ``privacy`` and ``audit`` sections of a job (:class:`fedpeft.config.JobConfig` holds them)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PrivacyConfig(_Section):
    """Differential privacy (see README "Privacy"); ``level: none`` (the default) turns it off.

    ``example``: DP-SGD in each site's local training (Opacus): every example's gradient clipped
    to ``max_grad_norm``, Gaussian noise of std ``noise_multiplier * max_grad_norm`` on each
    batch's sum, batches drawn by Poisson sampling with rate ``train.batch_size / site rows``.
    ``client``: DP-FedAvg (McMahan et al. 2018): each site clips its update's delta to
    ``clip_norm`` (L2 over all adapter tensors) and adds its share of Gaussian noise, so the sum
    carries std ``noise_multiplier * clip_norm``; updates are averaged with equal weights.
    Epsilon is reported at ``delta``. With ``target_epsilon`` and no ``noise_multiplier`` the
    noise is calibrated before the run so the last round ends at ``target_epsilon``; with both,
    the run stops before a round that would exceed ``target_epsilon``.
    """

    level: Literal["none", "example", "client"] = "none"
    noise_multiplier: float | None = Field(None, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)  # example level: per-example gradient clip
    clip_norm: float = Field(0.5, gt=0)  # client level: per-update delta clip
    delta: float = Field(1e-5, gt=0, lt=1)
    target_epsilon: float | None = Field(None, gt=0)
    accountant: Literal["rdp", "pld"] = "rdp"


class AuditConfig(_Section):
    """Canary audit (Carlini et al. 2019, "The Secret Sharer"); ``canaries: 0`` (default) is off.

    ``canaries`` synthetic records (a fake patient name with a random ``secret_digits``-digit
    number, in the question/answer format of the data) are planted ``repetitions`` times each
    into client ``client``'s training rows. ``fedpeft audit RUN_DIR`` then ranks each true secret
    among ``candidates`` random ones by the global adapter's likelihood (exposure) and checks
    whether greedy generation reproduces it. Canaries live only in memory and in the run folder.
    """

    canaries: int = Field(0, ge=0)
    repetitions: int = Field(10, ge=1)
    client: int = Field(0, ge=0)
    candidates: int = Field(2000, ge=10)
    secret_digits: int = Field(9, ge=3, le=18)


def privacy_problems(p: PrivacyConfig) -> list[tuple[tuple[str, ...], str]]:
    """The problems of a ``privacy`` section that one field alone cannot show."""
    if p.level == "none":
        return []
    if p.noise_multiplier is None and p.target_epsilon is None:
        return [(("privacy", "noise_multiplier"), f"privacy.level {p.level!r} needs a noise_multiplier, a "
                 "target_epsilon (the noise is then calibrated before the run), or both")]
    if p.noise_multiplier == 0:
        return [(("privacy", "noise_multiplier"), "0 adds no noise: the epsilon would be infinite; "
                 "give a positive noise_multiplier or set privacy.level: none")]
    return []
