"""The privacy budget of a run: epsilon spent so far, rebuilt from the round records.

Both levels are accounted with :mod:`fedpeft.privacy.accounting` (``dp_accounting``), composing
one event per release:

* ``client``: one Poisson-subsampled Gaussian per round, rate ``q = clients sampled / clients``,
  noise multiplier ``noise_multiplier * sqrt(updates summed / clients sampled)`` (less noise if
  a client dropped out and its share is missing). fedpeft samples a *fixed number* of clients
  per round; accounting it as Poisson sampling is the usual approximation (McMahan et al. 2018);
  with every client in every round (``q = 1``) nothing is approximated.
* ``example``: per client, its DP-SGD steps of every round it trained in (noise, Poisson rate
  and steps as its training reported them); the run's epsilon is the largest client's.

Everything comes from ``metrics.jsonl`` records, so a resumed run accounts exactly the rounds
its checkpoint holds, and the simulation and a deployment of the same job report the same epsilon.
"""

from __future__ import annotations

import logging
import math

from fedpeft.config import JobConfig, PrivacyConfig
from fedpeft.constants import KEY_DP_NOISE, KEY_DP_SAMPLE_RATE, KEY_DP_STEPS

log = logging.getLogger(__name__)
Event = tuple[float, float, int]  # (noise multiplier, sample rate, steps)


def events_epsilon(events: list[Event], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of the composition of ``events`` (:func:`~fedpeft.privacy.accounting.composed_epsilon`)."""
    from fedpeft.privacy.accounting import composed_epsilon

    return composed_epsilon(events, delta, accountant)  # type: ignore[arg-type]


def resolve_noise(cfg: JobConfig) -> JobConfig:
    """Calibrate client-level noise to ``target_epsilon`` before a run (when no noise is given).

    Example-level noise depends on each client's example count, so each client calibrates its
    own (:func:`fedpeft.privacy.example_level.example_level_noise`) when it trains.
    """
    p = cfg.privacy
    if p.level != "client" or p.noise_multiplier is not None:
        return cfg
    from fedpeft.privacy.accounting import calibrate_noise

    q = cfg.sampled_per_round() / cfg.federation.num_clients
    noise = calibrate_noise(p.target_epsilon, q, cfg.federation.rounds, p.delta, p.accountant)
    log.info("privacy: noise_multiplier %.4f calibrated so that %d rounds (q=%.3f) end at epsilon %.3g "
             "(delta %.1e)", noise, cfg.federation.rounds, q, p.target_epsilon, p.delta)
    noise = math.ceil(noise * 1e6) / 1e6  # rounded up: the last round stays within the target
    return cfg.model_copy(update={"privacy": p.model_copy(update={"noise_multiplier": noise})})


class Ledger:
    """What each release cost; ``epsilon()`` is the run's epsilon so far."""

    def __init__(self, cfg: JobConfig) -> None:
        self.privacy: PrivacyConfig = cfg.privacy
        self.q = cfg.sampled_per_round() / cfg.federation.num_clients
        self.rounds: list[Event] = []  # client level
        self.clients: dict[str, list[Event]] = {}  # example level
        self.stopped_before: int | None = None  # the round target_epsilon kept from running

    @property
    def enabled(self) -> bool:
        return self.privacy.level != "none"

    def add(self, record: dict) -> None:
        """Account one round's ``metrics.jsonl`` record."""
        if self.privacy.level == "client" and record.get("privacy"):
            self.rounds.append((record["privacy"]["effective_noise_multiplier"], self.q, 1))
        elif self.privacy.level == "example":
            for c in record.get("clients", []):
                if KEY_DP_NOISE in c:
                    self.clients.setdefault(c["client_id"], []).append(
                        (c[KEY_DP_NOISE], c[KEY_DP_SAMPLE_RATE], c[KEY_DP_STEPS]))

    def round_privacy(self, sampled: int, summed: int) -> dict:
        """The ``privacy`` entry of a round record (before :meth:`add`)."""
        p = self.privacy
        entry: dict = {"level": p.level, "delta": p.delta, "accountant": p.accountant}
        if p.level == "client":
            noise = p.noise_multiplier or 0.0
            entry.update(noise_multiplier=noise, clip_norm=p.clip_norm, shares=sampled, summed=summed,
                         effective_noise_multiplier=round(noise * math.sqrt(summed / max(sampled, 1)), 6))
        else:
            entry.update(max_grad_norm=p.max_grad_norm)
        return entry

    def epsilon(self, extra_round: bool = False) -> float:
        """Epsilon so far; with ``extra_round``, if one more round like the last one ran."""
        p = self.privacy
        if p.level == "client":
            more = [(p.noise_multiplier or 0.0, self.q, 1)] if extra_round else []
            return events_epsilon(self.rounds + more, p.delta, p.accountant)
        return max(self.per_client(extra_round).values(), default=0.0)

    def per_client(self, extra_round: bool = False) -> dict[str, float]:
        """Example level: each client's epsilon (with ``extra_round``: after one more of its rounds)."""
        p = self.privacy
        return {cid: events_epsilon(ev + ev[-1:] * extra_round, p.delta, p.accountant)
                for cid, ev in sorted(self.clients.items())}

    def over_target(self) -> float | None:
        """The epsilon one more round would reach, if that exceeds ``target_epsilon`` (then stop)."""
        p = self.privacy
        if not self.enabled or p.target_epsilon is None or p.noise_multiplier is None:
            return None
        projected = self.epsilon(extra_round=True)
        return projected if projected > p.target_epsilon * (1 + 1e-9) else None


def site_epsilon(cfg: JobConfig, num_examples: int, shares: int, secure: bool) -> float:
    """The epsilon one site's data would reach over all ``federation.rounds`` rounds of ``cfg``.

    Assumes the site trains in every round (the most it can spend). Example level: its DP-SGD
    steps (noise given, or calibrated to ``target_epsilon``). Client level: the subsampled
    Gaussian with the job's noise; without secure aggregation the coordinator sees this site's
    update with only its share of the noise, ``noise / sqrt(shares)``. No DP: infinite.
    """
    p, rounds = cfg.privacy, cfg.federation.rounds
    if p.level == "none":
        return math.inf
    from fedpeft.privacy.accounting import epsilon

    if p.level == "example":
        from fedpeft.privacy.example_level import dp_schedule, private_steps

        noise = private_steps(p, num_examples, cfg.train, rounds).keywords["noise_multiplier"]
        steps, rate = dp_schedule(num_examples, cfg.train)
        return epsilon(noise, rate, steps * rounds, p.delta, p.accountant)
    noise = resolve_noise(cfg).privacy.noise_multiplier
    noise = noise if secure else noise / math.sqrt(max(shares, 1))
    return epsilon(noise, cfg.sampled_per_round() / cfg.federation.num_clients, rounds, p.delta, p.accountant)
