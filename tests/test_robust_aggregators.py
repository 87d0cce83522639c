"""Robust rules on hand-computed tensors: coordinate-wise median, trimmed mean, norm-bounded FedAvg."""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft.aggregators import aggregate, build_aggregator
from fedpeft.errors import AggregationError, ConfigError
from fedpeft.rounds import new_fold
from fedpeft.state import ClientUpdate
from tiny_jobs import tiny_job
from fedpeft.config import validate_tree


def upd(cid: str, n: int, *values: float) -> ClientUpdate:
    return ClientUpdate(cid, {"w": torch.tensor(values)}, n)


G = {"w": torch.zeros(3)}
# three honest clients and one that sends its update scaled by 100
UPDATES = [upd("a", 1, 1.0, 2.0, -1.0), upd("b", 5, 3.0, 0.0, 1.0), upd("c", 1, 2.0, 4.0, 0.0),
           upd("evil", 100, 200.0, -300.0, 100.0)]


def test_median_is_coordinatewise_and_averages_the_two_middle_values_when_even():
    new = aggregate(build_aggregator("median", {}), G, UPDATES)
    # per coordinate sorted: [1,2,3,200] -> 2.5; [-300,0,2,4] -> 1; [-1,0,1,100] -> 0.5
    assert torch.equal(new["w"], torch.tensor([2.5, 1.0, 0.5]))
    odd = aggregate(build_aggregator("median", {}), G, UPDATES[:3])
    assert torch.equal(odd["w"], torch.tensor([2.0, 2.0, 0.0]))  # weights ignored (b claims 5 examples)


def test_trimmed_mean_cuts_k_values_from_each_end_per_coordinate():
    new = aggregate(build_aggregator("trimmed_mean", {"trim": 0.25}), G, UPDATES)  # k = 1 of 4
    assert torch.allclose(new["w"], torch.tensor([2.5, 1.0, 0.5]))  # middle two of each coordinate
    five = UPDATES + [upd("d", 1, 0.0, 1.0, 2.0)]
    new = aggregate(build_aggregator("trimmed_mean", {"trim": 0.2}), G, five)  # k = 1 of 5
    # sorted: [0,1,2,3,200] -> mean(1,2,3)=2; [-300,0,1,2,4] -> 1; [-1,0,1,2,100] -> 1
    assert torch.allclose(new["w"], torch.tensor([2.0, 1.0, 1.0]))


def test_trimmed_mean_with_nothing_to_trim_is_the_unweighted_mean_and_says_so(caplog):
    new = aggregate(build_aggregator("trimmed_mean", {"trim": 0.2}), G, UPDATES[:3])  # floor(0.6) = 0
    assert torch.allclose(new["w"], torch.tensor([2.0, 2.0, 0.0]))
    assert "cuts none" in caplog.text


def test_norm_bounded_clips_each_delta_then_takes_the_weighted_mean():
    agg = build_aggregator("norm_bounded", {"max_norm": 5.0})
    g = {"w": torch.tensor([1.0, 1.0])}
    small = ClientUpdate("a", {"w": torch.tensor([4.0, 5.0])}, 1)  # delta (3, 4): norm 5, kept
    big = ClientUpdate("b", {"w": torch.tensor([31.0, 41.0])}, 3)  # delta (30, 40): norm 50 -> (3, 4)
    other = ClientUpdate("c", {"w": torch.tensor([1.0, -9.0])}, 1)  # delta (0, -10) -> (0, -5)
    new = aggregate(agg, g, [small, big, other])
    expected = (torch.tensor([4.0, 5.0]) * 1 + torch.tensor([4.0, 5.0]) * 3 + torch.tensor([1.0, -4.0])) / 5
    assert torch.allclose(new["w"], expected)
    plain = aggregate(build_aggregator("fedavg", {}), g, [small, big, other])
    assert not torch.allclose(plain["w"], expected)  # clipping changed the result


def test_norm_bounded_streams_through_the_fold_with_the_same_result():
    agg = build_aggregator("norm_bounded", {"max_norm": 5.0})
    fold = new_fold(validate_tree(tiny_job("x")), agg, G, [u.client_id for u in UPDATES], "r")
    assert not fold.hold and fold.prepare is not None
    for u in UPDATES:
        fold.add(u)
    _, mean = fold.result()
    assert fold.peak_held == 1
    assert torch.allclose(agg.step(G, mean)["w"], aggregate(agg, G, UPDATES)["w"])


@pytest.mark.parametrize("name", ["median", "trimmed_mean"])
def test_rules_reading_each_update_make_the_fold_hold_them_and_refuse_a_mean(name):
    agg = build_aggregator(name, {})
    fold = new_fold(validate_tree(tiny_job("x")), agg, G, ["a", "b", "c", "evil"], "r")
    for u in reversed(UPDATES):
        fold.add(u)
    updates, mean = fold.result()
    assert mean is None and [u.client_id for u in updates] == ["a", "b", "c", "evil"]  # sampled order
    assert fold.peak_held == 4
    with pytest.raises(AggregationError, match="secure aggregation reveals only their mean"):
        agg.step(G, {"w": torch.zeros(3)})


def test_the_scaled_update_moves_fedavg_far_but_not_the_robust_rules():
    honest = aggregate(build_aggregator("fedavg", {}), G, UPDATES[:3])["w"]
    for name, params in [("median", {}), ("trimmed_mean", {"trim": 0.25}), ("norm_bounded", {"max_norm": 5.0})]:
        robust = aggregate(build_aggregator(name, params), G, UPDATES)["w"]
        assert float((robust - honest).norm()) < 5, name
    assert float((aggregate(build_aggregator("fedavg", {}), G, UPDATES)["w"] - honest).norm()) > 100


@pytest.mark.parametrize(("name", "params", "message"), [
    ("trimmed_mean", {"trim": 0.5}, "`trim` must be in [0, 0.5), got 0.5"),
    ("norm_bounded", {"max_norm": 0.0}, "`max_norm` must be > 0, got 0"),
])
def test_hyperparameters_are_checked(name, params, message):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        build_aggregator(name, params)


def test_median_keeps_a_nan_free_result_when_every_update_is_finite():
    new = aggregate(build_aggregator("median", {}), G, UPDATES)
    assert all(math.isfinite(v) for v in new["w"].tolist())
