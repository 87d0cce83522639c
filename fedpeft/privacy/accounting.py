"""Privacy accounting for the Poisson-subsampled Gaussian mechanism, with Google's ``dp_accounting``.

One DP-SGD step (example level) or one DP-FedAvg round (client level) releases a sum of
clipped contributions plus Gaussian noise of std ``noise_multiplier * clip``, over a batch in
which each record took part independently with probability ``sample_rate`` (Poisson
sampling). ``steps`` such releases compose. Two accountants:

* ``rdp``: Renyi DP (Mironov 2017; subsampled Gaussian of Mironov, Talwar & Zhang 2019),
  converted to (epsilon, delta) with the tighter conversion of Balle et al. 2020 (the one
  Opacus uses as well).
* ``pld``: privacy loss distributions (Koskela et al. 2020; Doroshenko et al. 2022), tighter
  than RDP (smaller epsilon for the same noise) but slower, and much slower for little noise.

Neighbouring datasets differ by adding or removing one record (``ADD_OR_REMOVE_ONE``), the
relation Poisson sampling is analysed under.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import dp_accounting
from dp_accounting import pld, rdp
from dp_accounting.mechanism_calibration import ExplicitBracketInterval

Accountant = Literal["rdp", "pld"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld")
MIN_NOISE = 0.01  # calibration never goes below; RDP epsilon of one full-batch step is ~5e3 here
_CALIBRATION_TOL = 1e-4  # in noise-multiplier units; the result always meets the target


def _check(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> None:
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if not 0 <= sample_rate <= 1:
        raise ValueError(f"sample_rate must be in [0, 1] (a Poisson sampling probability), got {sample_rate}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; valid: {', '.join(ACCOUNTANTS)}")


def dp_event(noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
    """``steps`` compositions of a Gaussian mechanism on a Poisson sample of rate ``sample_rate``."""
    step = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(step, steps)


def make_accountant(accountant: Accountant = "rdp") -> dp_accounting.PrivacyAccountant:
    """A fresh (empty) ``dp_accounting`` accountant of the named kind."""
    return rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()


@contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silence dp_accounting's absl warnings that an RDP order below 2 did not converge.

    The RDP accountant then just leaves that order out of the minimum over orders, which can
    only make epsilon larger (safe); one warning per order per call would flood the run log.
    """
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
            accountant: Accountant = "rdp") -> float:
    """Epsilon after ``steps`` Poisson-subsampled Gaussian releases, at ``delta``.

    Args:
        noise_multiplier: Noise std divided by the clipping norm (sensitivity).
        sample_rate: Probability that a record takes part in one step (Poisson sampling).
        steps: Number of composed steps (0 releases nothing: epsilon 0).
        delta: Target delta.
        accountant: ``rdp`` or ``pld``.

    Returns:
        Epsilon; ``inf`` when ``noise_multiplier`` is 0 and any record can be sampled.

    Raises:
        ValueError: on an argument out of range or an unknown accountant.
    """
    _check(noise_multiplier, sample_rate, steps, delta, accountant)
    if steps == 0 or sample_rate == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    with _quiet_absl():
        acc = make_accountant(accountant).compose(dp_event(noise_multiplier, sample_rate, steps))
        return float(acc.get_epsilon(delta))


def calibrate_noise(target_epsilon: float, sample_rate: float, steps: int, delta: float,
                    accountant: Accountant = "rdp") -> float:
    """The smallest noise multiplier whose epsilon after ``steps`` steps is at most ``target_epsilon``.

    Uses ``dp_accounting.calibrate_dp_mechanism`` (Brent's method, then a check that the result
    meets the target). PLD is slow for little noise, so it searches between half and all of the
    RDP answer (PLD never needs more noise than RDP), widening downwards if needed.

    Returns:
        The noise multiplier, within ``1e-4`` above the true minimum; 0.0 when nothing is
        released (``steps`` or ``sample_rate`` 0), and ``MIN_NOISE`` when even that meets a
        (very large) target.

    Raises:
        ValueError: on an argument out of range or a non-positive ``target_epsilon``.
    """
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    _check(0.0, sample_rate, steps, delta, accountant)
    if steps == 0 or sample_rate == 0:
        return 0.0
    if epsilon(MIN_NOISE, sample_rate, steps, delta, accountant="rdp") <= target_epsilon:
        return MIN_NOISE
    upper = _rdp_upper_bound(target_epsilon, sample_rate, steps, delta)
    upper = _calibrate(target_epsilon, sample_rate, steps, delta, "rdp", MIN_NOISE, upper)
    if accountant == "rdp":
        return upper
    lower = upper / 2
    while epsilon(lower, sample_rate, steps, delta, "pld") <= target_epsilon:
        if lower <= MIN_NOISE:
            return MIN_NOISE
        lower = max(lower / 2, MIN_NOISE)
    return _calibrate(target_epsilon, sample_rate, steps, delta, "pld", lower, upper)


def _rdp_upper_bound(target_epsilon: float, sample_rate: float, steps: int, delta: float) -> float:
    """A noise multiplier whose RDP epsilon is at most the target (doubling from 1)."""
    noise = 1.0
    while epsilon(noise, sample_rate, steps, delta, "rdp") > target_epsilon:
        noise *= 2
    return noise


def _calibrate(target_epsilon: float, sample_rate: float, steps: int, delta: float, accountant: Accountant,
               lower: float, upper: float) -> float:
    """Brent search for the noise in ``[lower, upper]`` reaching ``target_epsilon``."""
    if lower >= upper:
        return upper
    with _quiet_absl():
        return float(dp_accounting.calibrate_dp_mechanism(
            lambda: make_accountant(accountant),
            lambda noise: dp_event(noise, sample_rate, steps),
            target_epsilon, delta, ExplicitBracketInterval(lower, upper), tol=_CALIBRATION_TOL,
        ))


def composed_epsilon(events: list[tuple[float, float, int]], delta: float, accountant: Accountant = "rdp") -> float:
    """Epsilon at ``delta`` of several ``(noise_multiplier, sample_rate, steps)`` mechanisms composed.

    Rounds of one run may differ (a client that dropped out took its noise share with it;
    sites with other row counts sample at other rates); equal events are grouped first.
    """
    for noise, rate, steps in events:
        _check(noise, rate, steps, delta, accountant)
    events = [e for e in events if e[1] > 0 and e[2] > 0]
    if not events:
        return 0.0
    if any(noise == 0 for noise, _, _ in events):
        return math.inf
    with _quiet_absl():
        acc = make_accountant(accountant)
        for (noise, rate, steps), count in sorted(Counter(events).items()):
            acc.compose(dp_event(noise, rate, steps * count))
        return float(acc.get_epsilon(delta))
