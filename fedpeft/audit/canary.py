"""Synthetic canary records for the memorisation audit, and planting them into one client's rows.

Carlini et al. 2019, "The Secret Sharer: Evaluating and Testing Unintended Memorization in
Neural Networks" (https://arxiv.org/abs/1802.08232). A canary is a fake patient record whose
only unpredictable part is a random ``secret_digits``-digit number; ``k`` of them are planted
``r`` times each into one client's training rows, ``k`` more (the *unseen* controls) come from
the same generator and are never trained on. Names are drawn from a small built-in list with a
seeded RNG, so the audit regenerates the same canaries from ``(seed, audit)`` alone and never
touches real rows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from fedpeft.config import AuditConfig
from fedpeft.errors import ConfigError

FIRST_NAMES = (
    "Alma", "Bruno", "Carmen", "Dario", "Elsa", "Fabian", "Greta", "Hugo", "Ines", "Jonas",
    "Klara", "Lorenz", "Mira", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Sven", "Tilda",
    "Ugo", "Vera", "Wim", "Xenia", "Yusuf", "Zora",
)
LAST_NAMES = (
    "Abernathy", "Brandvold", "Castellano", "Drummond", "Eriksen", "Falkenrath", "Grimaldi",
    "Halvorsen", "Iglesias", "Jankowski", "Kowalczyk", "Lindqvist", "Marchetti", "Nakamura",
    "Oyelaran", "Petrakis", "Quintero", "Rasmussen", "Szabo", "Thorvaldsen", "Urquhart",
    "Valdivia", "Wojcik", "Yamashita", "Zielinski",
)
CANARY_ID_PREFIX = "canary-"


@dataclass(frozen=True)
class Canary:
    """One synthetic record; ``answer == prefix + secret + "."``.

    Attributes:
        name: The fake patient's name.
        question: The question, in the data's question/answer format.
        answer: The full answer, with the secret.
        prefix: The answer up to the secret (what the model is conditioned on when scoring).
        secret: The random number, ``secret_digits`` digits (leading zeros kept).
    """

    name: str
    question: str
    answer: str
    prefix: str
    secret: str

    def with_secret(self, secret: str) -> str:
        """The answer with ``secret`` in place of the true one (a candidate record)."""
        return f"{self.prefix}{secret}."

    def row(self, index: int) -> dict:
        """The training row (``id``, ``question``, ``answer``) of this canary."""
        return {"id": f"{CANARY_ID_PREFIX}{index}", "question": self.question, "answer": self.answer}


def make_canary(name: str, secret: str) -> Canary:
    """The canary record of ``name`` with ``secret``."""
    prefix = f"The record number of {name} is "
    return Canary(name, f"What is the patient record number of {name}?", f"{prefix}{secret}.", prefix, secret)


def random_secret(rng: random.Random, digits: int) -> str:
    """A uniformly random ``digits``-digit string (leading zeros allowed: ``10**digits`` values)."""
    return str(rng.randrange(10**digits)).zfill(digits)


def make_canaries(audit: AuditConfig, seed: int) -> tuple[list[Canary], list[Canary]]:
    """``(planted, unseen)``: ``audit.canaries`` canaries each, all names and secrets distinct.

    Deterministic in ``(seed, audit.canaries, audit.secret_digits)``; the unseen controls are
    drawn exactly like the planted ones, so their exposure is what chance alone gives.

    Raises:
        ConfigError: if more canaries are asked for than the built-in names allow.
    """
    k = audit.canaries
    if 2 * k > len(FIRST_NAMES) * len(LAST_NAMES):
        raise ConfigError(f"audit.canaries: at most {len(FIRST_NAMES) * len(LAST_NAMES) // 2} canaries have distinct "
                          f"names, got {k}; plant fewer canaries (a handful is enough) or more repetitions")
    rng = random.Random(f"fedpeft-canaries-{seed}-{k}-{audit.secret_digits}")
    pairs = rng.sample([(f, last) for f in FIRST_NAMES for last in LAST_NAMES], 2 * k)
    secrets: dict[str, None] = {}  # insertion-ordered (a set's order varies between processes)
    while len(secrets) < 2 * k:
        secrets[random_secret(rng, audit.secret_digits)] = None
    canaries = [make_canary(f"{f} {last}", s) for (f, last), s in zip(pairs, secrets)]
    return canaries[:k], canaries[k:]


def plant(rows: list[dict], planted: list[Canary], repetitions: int, seed: int) -> list[dict]:
    """A new list: ``rows`` with each canary's row inserted ``repetitions`` times at seeded positions.

    The input list and its rows are not modified; the original rows keep their order.

    Args:
        rows: One client's training rows.
        planted: The canaries to plant.
        repetitions: Copies of each canary.
        seed: Seeds the positions.

    Returns:
        ``len(rows) + len(planted) * repetitions`` rows.
    """
    extra = [c.row(i) for i, c in enumerate(planted) for _ in range(repetitions)]
    rng = random.Random(f"fedpeft-plant-{seed}")
    total = len(rows) + len(extra)
    slots = set(rng.sample(range(total), len(extra)))  # where the canary rows go
    real, canary = iter(rows), iter(rng.sample(extra, len(extra)))  # canaries in shuffled order
    return [next(canary) if pos in slots else next(real) for pos in range(total)]


def is_canary_row(row: dict) -> bool:
    """Whether ``row`` was planted by :func:`plant`."""
    return str(row.get("id", "")).startswith(CANARY_ID_PREFIX)
