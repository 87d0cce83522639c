"""Client sampling: a seeded sample per (seed, round), so a resumed run picks the same clients."""

from __future__ import annotations

from fedpeft.config import JobConfig
from fedpeft.rounds import sample_clients

CLIENTS = [f"client-{i}" for i in range(10)]


def _cfg(clients_per_round: int | float | None, seed: int = 0) -> JobConfig:
    return JobConfig.model_validate({"seed": seed, "federation": {"num_clients": len(CLIENTS),
                                                                  "clients_per_round": clients_per_round}})


def test_a_round_samples_k_distinct_clients_in_client_order():
    for rnd in range(1, 21):
        picked = sample_clients(_cfg(3), rnd, CLIENTS)
        assert len(set(picked)) == 3 and set(picked) <= set(CLIENTS)
        assert picked == sorted(picked, key=CLIENTS.index)


def test_the_sample_depends_on_seed_and_round_alone():
    cfg = _cfg(3)
    rounds = [sample_clients(cfg, rnd, CLIENTS) for rnd in range(1, 21)]
    assert [sample_clients(_cfg(3), rnd, CLIENTS) for rnd in range(1, 21)] == rounds  # a fresh config
    assert len({tuple(r) for r in rounds}) >= 10  # rounds differ (120 possible samples of 3)
    other_seed = [sample_clients(_cfg(3, seed=1), rnd, CLIENTS) for rnd in range(1, 21)]
    assert other_seed != rounds
    # every client gets its turn over 20 rounds of 3 out of 10
    assert {c for r in rounds for c in r} == set(CLIENTS)


def test_a_fraction_samples_like_the_same_count():
    for rnd in (1, 2, 3):
        assert sample_clients(_cfg(0.3), rnd, CLIENTS) == sample_clients(_cfg(3), rnd, CLIENTS)
    assert len(sample_clients(_cfg(0.05), 1, CLIENTS)) == 1  # at least one client
    assert len(sample_clients(_cfg(0.5), 1, CLIENTS)) == 5


def test_everyone_trains_when_all_are_asked_for():
    for k in (None, 10, 1.0):
        assert sample_clients(_cfg(k), 4, CLIENTS) == CLIENTS
