"""Baseline set-ups: matched optimizer steps, one client each, shared signatures (no model runs)."""

from __future__ import annotations

import pytest

from fedpeft.benchmark import baselines as bl
from fedpeft.config import JobConfig
from fedpeft.data.federated import FederatedData
from fedpeft.trainer import num_optimizer_steps


def _data(sizes: list[int]) -> FederatedData:
    rows = [[{"question": f"q{c}-{i}", "answer": "a"} for i in range(n)] for c, n in enumerate(sizes)]
    return FederatedData([f"client-{c}" for c in range(len(sizes))], rows, [{"question": "t", "answer": "a"}],
                         [{"client": c, "size": n} for c, n in enumerate(sizes)])


@pytest.mark.parametrize("train, total", [
    ({"batch_size": 4, "local_epochs": 1}, 3 * (3 + 2 + 1 + 5)),  # steps follow the data
    ({"batch_size": 4, "max_steps": 2}, 3 * (2 + 2 + 1 + 2)),  # capped, but 3 rows make one batch
    ({"batch_size": 2, "local_epochs": 2, "grad_accum": 3}, 3 * (4 + 3 + 2 + 6)),  # ceil(2 ceil(n/2) / 3)
])
def test_centralized_takes_as_many_optimizer_steps_as_the_federated_run(train, total):
    cfg = JobConfig.model_validate({"federation": {"num_clients": 4, "rounds": 3}, "train": train})
    data = _data([10, 8, 3, 17])
    fed_total = bl.federated_steps(cfg, data)
    assert fed_total == total
    central, central_data, per_round = bl.centralized(cfg, data)
    assert central_data.client_ids == ["central"] and len(central_data.client_rows[0]) == 38
    assert central.federation.num_clients == 1 and central.federation.rounds == 3
    steps = num_optimizer_steps(38, central.train)
    assert steps == per_round and steps * 3 == fed_total
    assert central.train.batch_size == cfg.train.batch_size and central.train.learning_rate == cfg.train.learning_rate


def test_centralized_counts_only_sampled_clients():
    cfg = JobConfig.model_validate({"federation": {"num_clients": 4, "rounds": 2, "clients_per_round": 2},
                                    "train": {"batch_size": 1, "max_steps": 5}})
    assert bl.federated_steps(cfg, _data([9, 9, 9, 9])) == 2 * 2 * 5


def test_local_only_gives_each_client_its_own_partition_and_the_same_schedule():
    cfg = JobConfig.model_validate({"federation": {"num_clients": 3, "rounds": 2, "clients_per_round": 2,
                                                   "aggregation": {"name": "fedavgm", "beta": 0.9}},
                                    "train": {"max_steps": 3}})
    data = _data([4, 5, 6])
    runs = bl.local_only(cfg, data)
    assert [cid for cid, _, _ in runs] == ["client-0", "client-1", "client-2"]
    for (cid, one, d), n in zip(runs, (4, 5, 6)):
        assert d.client_ids == [cid] and len(d.client_rows[0]) == n and d.test_rows == data.test_rows
        assert one.federation.num_clients == 1 and one.federation.clients_per_round is None
        assert one.federation.aggregation.name == "fedavg" and one.federation.aggregation.params == {}
        assert one.federation.rounds == 2 and one.train == cfg.train and not one.eval.zero_shot


def test_signatures_ignore_aggregation_but_not_training():
    base = {"peft": {"method": "lora", "r": 4}, "train": {"learning_rate": 1e-3}}
    a = JobConfig.model_validate({**base, "federation": {"aggregation": {"name": "fedavg"}}, "job": "x"})
    b = JobConfig.model_validate({**base, "federation": {"aggregation": {"name": "fedavgm", "beta": 0.5}}, "job": "y"})
    c = JobConfig.model_validate({**base, "peft": {"method": "ptuning"}})
    assert bl.training_signature(a) == bl.training_signature(b) != bl.training_signature(c)
    assert bl.zero_shot_signature(a) == bl.zero_shot_signature(c)  # no adapter in a zero-shot run
    d = JobConfig.model_validate({**base, "data": {"max_test_samples": 3}})
    assert bl.zero_shot_signature(a) != bl.zero_shot_signature(d)
