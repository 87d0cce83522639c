"""Streaming aggregation: updates are summed as they arrive, in sampled order, bit for bit as before."""

from __future__ import annotations

import itertools

import pytest
import torch

from fedpeft.aggregators import weighted_mean
from fedpeft.errors import AggregationError
from fedpeft.fold import Fold
from fedpeft.state import ClientUpdate

G = {"w": torch.zeros(64), "b": torch.zeros(3, 2)}


def _updates(n: int) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(0)
    return [ClientUpdate(f"c{i}", {"w": torch.randn(64, generator=g) * 10 ** (i % 4),
                                   "b": torch.randn(3, 2, generator=g)}, i + 1) for i in range(n)]


def test_any_arrival_order_gives_the_weighted_mean_bit_for_bit():
    updates = _updates(5)
    expected = weighted_mean(updates)
    for order in itertools.islice(itertools.permutations(range(5)), 0, 120, 7):
        fold = Fold(G, [u.client_id for u in updates])
        for i in order:
            fold.add(updates[i])
        _, mean = fold.result()
        assert all(torch.equal(mean[k], expected[k]) for k in expected), order


def test_in_order_arrival_holds_one_update_and_out_of_order_ones_wait():
    updates = _updates(4)
    fold = Fold(G, [u.client_id for u in updates])
    for u in updates:
        fold.add(u)
    assert fold.peak_held == 1 and not fold._waiting
    fold = Fold(G, [u.client_id for u in updates])
    for u in reversed(updates):  # c3, c2, c1 wait for c0
        fold.add(u)
    assert fold.peak_held == 4 and not fold._waiting


def test_a_dropped_client_lets_the_later_ones_be_added():
    updates = _updates(3)
    fold = Fold(G, [u.client_id for u in updates])
    fold.add(updates[2])
    fold.add(updates[1])
    assert len(fold._waiting) == 2
    fold.drop("c0", "no reply within 60s")
    assert not fold._waiting  # summed as soon as c0 was known to be gone
    _, mean = fold.result()
    expected = weighted_mean(updates[1:])
    assert all(torch.equal(mean[k], expected[k]) for k in expected)
    assert fold.dropped == [{"client": "c0", "reason": "no reply within 60s"}]


def test_arrival_order_holds_at_most_one_and_is_close():
    updates = _updates(5)
    fold = Fold(G, [u.client_id for u in updates], ordered=False)
    for u in reversed(updates):
        fold.add(u)
    _, mean = fold.result()
    assert fold.peak_held == 1
    expected = weighted_mean(updates)
    assert all(torch.allclose(mean[k], expected[k], rtol=1e-6, atol=1e-6) for k in expected)


def test_a_rejected_update_never_reaches_the_sums_and_nothing_left_is_an_error():
    fold = Fold(G, ["c0"])
    bad = ClientUpdate("c0", {"w": torch.full((64,), float("nan")), "b": torch.zeros(3, 2)}, 1)
    assert "non-finite" in fold.add(bad)
    with pytest.raises(AggregationError, match="no client updates"):
        fold.result()
    zero = Fold(G, ["c0"])
    zero.add(ClientUpdate("c0", {k: torch.ones_like(v) for k, v in G.items()}, 0))
    with pytest.raises(AggregationError, match="total num_examples of the updates is 0"):
        zero.result()
