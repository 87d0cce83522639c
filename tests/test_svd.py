"""SVD aggregation on hand-computed LoRA factors: the exact mean product, truncated to rank r."""

from __future__ import annotations

import pytest
import torch

from fedpeft.aggregators import aggregate, build_aggregator
from fedpeft.aggregators.svd import refactorise
from fedpeft.config import validate_tree
from fedpeft.errors import AggregationError
from fedpeft.io_utils import read_jsonl
from fedpeft.simulation import run_job
from fedpeft.state import ClientUpdate
from tiny_jobs import tiny_job

A, B = "layer.lora_A.default.weight", "layer.lora_B.default.weight"


def _client(cid: str, n: int, b: list, a: list) -> ClientUpdate:
    return ClientUpdate(cid, {A: torch.tensor(a), B: torch.tensor(b), "layer.bias": torch.full((2,), float(n))}, n)


def test_two_rank_one_clients_give_the_best_rank_one_part_of_the_mean_product():
    # B1 A1 = diag(1, 0), B2 A2 = diag(0, 2); equal weights: the mean product is diag(0.5, 1),
    # singular values 1 and 0.5; rank 1 keeps diag(0, 1) and 1 / 1.25 = 0.8 of the energy.
    g = {A: torch.zeros(1, 2), B: torch.zeros(2, 1), "layer.bias": torch.zeros(2)}
    updates = [_client("x", 1, [[1.0], [0.0]], [[1.0, 0.0]]), _client("y", 1, [[0.0], [1.0]], [[0.0, 2.0]])]
    agg = build_aggregator("svd", {})
    new = aggregate(agg, g, updates)
    assert torch.allclose(new[B] @ new[A], torch.tensor([[0.0, 0.0], [0.0, 1.0]]), atol=1e-6)
    assert agg.round_report == {"svd_energy_kept": 0.8, "svd_energy_kept_min": 0.8}
    assert torch.equal(new["layer.bias"], torch.ones(2))  # other tensors: the weighted mean
    fedavg = aggregate(build_aggregator("fedavg", {}), g, updates)  # factors averaged separately
    assert torch.allclose(fedavg[B] @ fedavg[A], torch.tensor([[0.25, 0.5], [0.25, 0.5]]))  # not the mean product


def test_at_full_rank_the_mean_product_is_exact_and_weighted():
    g = torch.Generator().manual_seed(0)
    bs = [torch.randn(6, 2, generator=g) for _ in range(3)]
    as_ = [torch.randn(2, 5, generator=g) for _ in range(3)]
    w = [0.5, 0.25, 0.25]
    b, a, share, _ = refactorise(bs, as_, w, rank=6)  # 3 clients x rank 2 = rank <= 6
    expected = sum(wi * bi @ ai for wi, bi, ai in zip(w, bs, as_))
    assert torch.allclose(b @ a, expected, atol=1e-5) and share == pytest.approx(1.0)
    b, a, share, _ = refactorise(bs, as_, w, rank=2)
    s = torch.linalg.svdvals(expected.double())
    assert share == pytest.approx(float((s[:2] ** 2).sum() / (s ** 2).sum()), rel=1e-6)
    best = torch.linalg.matrix_norm(expected.double() - (b @ a).double())
    assert float(best) == pytest.approx(float(s[2:].square().sum().sqrt()), rel=1e-5)  # Eckart-Young


def test_svd_refuses_a_mean_and_a_non_lora_adapter():
    with pytest.raises(AggregationError, match="secure aggregation"):
        build_aggregator("svd", {}).step({}, {})
    with pytest.raises(AggregationError, match="no lora_A/lora_B"):
        aggregate(build_aggregator("svd", {}), {"w": torch.zeros(2)}, [ClientUpdate("x", {"w": torch.ones(2)}, 1)])


def test_an_svd_run_records_the_energy_kept_each_round(tmp_path):
    job = {**tiny_job("svd"), "workspace": str(tmp_path)}
    job["federation"] = {**job["federation"], "aggregation": {"name": "svd"}}
    run = run_job(validate_tree(job))
    rounds = [r for r in read_jsonl(run.metrics_file) if r["event"] == "round"]
    assert len(rounds) == 2
    for r in rounds:
        assert 0.5 < r["aggregation"]["svd_energy_kept"] <= 1.0
        assert r["aggregation"]["svd_energy_kept_min"] <= r["aggregation"]["svd_energy_kept"]
