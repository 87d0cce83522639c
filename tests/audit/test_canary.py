"""Canaries: deterministic per seed, disjoint from the unseen controls, planted into one client only."""

from __future__ import annotations

import copy
import re

from fedpeft.audit.canary import is_canary_row, make_canaries, plant
from fedpeft.config import AuditConfig, validate_tree
from fedpeft.data.federated import prepare_data

AUDIT = AuditConfig(canaries=4, secret_digits=9)


def test_canaries_are_deterministic_per_seed_and_differ_between_seeds():
    assert make_canaries(AUDIT, 7) == make_canaries(AUDIT, 7)
    planted7, _ = make_canaries(AUDIT, 7)
    planted8, _ = make_canaries(AUDIT, 8)
    assert {c.secret for c in planted7}.isdisjoint(c.secret for c in planted8)


def test_planted_and_unseen_are_disjoint_and_well_formed():
    planted, unseen = make_canaries(AUDIT, 3)
    assert len(planted) == len(unseen) == 4
    everyone = planted + unseen
    assert len({c.name for c in everyone}) == 8 and len({c.secret for c in everyone}) == 8
    for c in everyone:
        assert re.fullmatch(r"\d{9}", c.secret)
        assert c.answer == c.prefix + c.secret + "." == c.with_secret(c.secret)
        assert c.name in c.question and c.name in c.prefix and c.secret not in c.question


def test_secret_digits_sets_the_length_and_leading_zeros_are_kept():
    planted, unseen = make_canaries(AuditConfig(canaries=50, secret_digits=3), 0)
    secrets = [c.secret for c in planted + unseen]
    assert all(len(s) == 3 and s.isdigit() for s in secrets)
    assert any(s.startswith("0") for s in secrets)  # 100 distinct 3-digit secrets: P(none with a 0 first) ~ 1e-5


def test_plant_inserts_k_times_r_rows_and_leaves_the_input_alone():
    rows = [{"id": f"r{i}", "question": f"q{i}?", "answer": f"a{i}."} for i in range(20)]
    before = copy.deepcopy(rows)
    planted, _ = make_canaries(AuditConfig(canaries=3), 0)
    out = plant(rows, planted, repetitions=5, seed=0)
    assert rows == before
    assert len(out) == 20 + 15
    canary_rows = [r for r in out if is_canary_row(r)]
    assert sorted(r["answer"] for r in canary_rows) == sorted(c.answer for c in planted for _ in range(5))
    assert [r for r in out if not is_canary_row(r)] == rows  # real rows keep their order
    assert out == plant(rows, planted, repetitions=5, seed=0)
    def positions(seed: int) -> list[int]:
        return [i for i, r in enumerate(plant(rows, planted, 5, seed)) if is_canary_row(r)]

    assert positions(0) != list(range(20, 35)) and positions(0) != positions(1)  # spread out, by the seed


def _job(**audit) -> dict:
    return {"seed": 2, "data": {"train": "builtin:sample", "test_ratio": 0.2, "max_train_samples": 30},
            "federation": {"num_clients": 3}, "audit": audit}


def test_prepare_data_plants_into_the_chosen_client_only_and_never_into_test_rows():
    plain = prepare_data(validate_tree(_job()))
    audited = prepare_data(validate_tree(_job(canaries=2, repetitions=4, client=1)))
    assert audited.client_rows[0] == plain.client_rows[0] and audited.client_rows[2] == plain.client_rows[2]
    client1 = audited.client_rows[1]
    assert len(client1) == len(plain.client_rows[1]) + 8
    assert [r for r in client1 if not is_canary_row(r)] == plain.client_rows[1]
    assert audited.test_rows == plain.test_rows
    assert not any(is_canary_row(r) for r in audited.test_rows)
    assert [s["size"] for s in audited.summary] == [len(p) for p in audited.client_rows]
    planted, _ = make_canaries(AuditConfig(canaries=2, repetitions=4, client=1), 2)
    assert {r["answer"] for r in client1 if is_canary_row(r)} == {c.answer for c in planted}


def test_no_canaries_by_default():
    data = prepare_data(validate_tree(_job()))
    assert not any(is_canary_row(r) for rows in data.client_rows for r in rows)
