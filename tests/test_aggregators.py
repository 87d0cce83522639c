"""Aggregators on small hand-computed tensors (no models)."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch

from fedpeft.aggregators import (
    AGGREGATORS,
    Aggregator,
    aggregate,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    build_aggregator,
    weighted_mean,
)
from fedpeft.errors import AggregationError, ConfigError, RegistryError
from fedpeft.params import param_errors
from fedpeft.state import ClientUpdate, State

ALL_NAMES = ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"]
ROBUST_NAMES = ["median", "trimmed_mean", "norm_bounded", "svd"]  # test_robust_aggregators.py, test_svd.py
# Hyperparameters for the adaptive tests: tau = 2 makes v start at 4, so square roots stay simple.
ADAPTIVE = {"server_lr": 1.0, "beta1": 0.5, "tau": 2.0}


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def upd(client_id: str, n: int, **state: torch.Tensor) -> ClientUpdate:
    return ClientUpdate(client_id=client_id, state=dict(state), num_examples=n)


def assert_state(actual: State, expected: dict[str, list[float]], rel: float = 1e-6) -> None:
    assert set(actual) == set(expected)
    for key, values in expected.items():
        assert actual[key].dtype == torch.float32
        assert actual[key].tolist() == pytest.approx(values, rel=rel, abs=1e-7), key


# --- weighted mean and FedAvg ---------------------------------------------------------------


def test_weighted_mean_weights_by_num_examples() -> None:
    updates = [upd("a", 1, w=t(1.0, 2.0)), upd("b", 3, w=t(5.0, 10.0))]
    # (1*1 + 3*5) / 4 = 4 ; (1*2 + 3*10) / 4 = 8  (an unweighted mean would give 3 and 6)
    assert_state(weighted_mean(updates), {"w": [4.0, 8.0]})


def test_weighted_mean_sums_in_float64() -> None:
    # 2**24 + 1 is not representable in float32; a float32 running sum of 3 * (2**24 + 1) and
    # 1 * (2**24 - 3) would round. In float64 the mean is exactly 2**24 (representable).
    big = 2.0**24
    updates = [
        upd("a", 3, w=torch.tensor([big + 1], dtype=torch.float64)),
        upd("b", 1, w=torch.tensor([big - 3], dtype=torch.float64)),
    ]
    mean = weighted_mean(updates)["w"]
    assert mean.dtype == torch.float32
    assert mean.item() == big


def test_fedavg_returns_weighted_mean() -> None:
    global_state = {"w": t(0.0, 0.0), "b": t(7.0)}
    updates = [upd("a", 1, w=t(1.0, 2.0), b=t(4.0)), upd("b", 3, w=t(5.0, 10.0), b=t(0.0))]
    # b: (1*4 + 3*0) / 4 = 1
    assert_state(aggregate(FedAvg(), global_state, updates), {"w": [4.0, 8.0], "b": [1.0]})


@pytest.mark.parametrize("name", ALL_NAMES)
def test_aggregate_does_not_mutate_inputs(name: str) -> None:
    global_state = {"w": t(1.0, -1.0)}
    updates = [upd("a", 2, w=t(3.0, 0.0)), upd("b", 1, w=t(-2.0, 5.0))]
    before = ({"w": global_state["w"].clone()}, [u.state["w"].clone() for u in updates])
    agg = build_aggregator(name, {})
    new = aggregate(agg, global_state, updates)
    aggregate(agg, new, updates)  # a second round exercises the optimizer state too
    assert torch.equal(global_state["w"], before[0]["w"])
    assert all(torch.equal(u.state["w"], w) for u, w in zip(updates, before[1]))
    inputs = {global_state["w"].data_ptr(), updates[0].state["w"].data_ptr()}
    assert new["w"].data_ptr() not in inputs


# --- FedAvgM --------------------------------------------------------------------------------


def test_fedavgm_without_momentum_equals_fedavg() -> None:
    fedavg, fedavgm = FedAvg(), FedAvgM(beta=0.0, server_lr=1.0)
    state_a = state_m = {"w": t(10.0, -4.0)}
    for means in ([6.0, -2.0], [4.0, 0.0]):
        updates = [upd("a", 1, w=t(*means)), upd("b", 1, w=t(*means))]
        state_a = aggregate(fedavg, state_a, updates)
        state_m = aggregate(fedavgm, state_m, updates)
        assert torch.allclose(state_a["w"], state_m["w"])


def test_fedavgm_momentum_changes_second_round() -> None:
    agg = FedAvgM(beta=0.5, server_lr=1.0)
    # Round 1: g = global - mean = [10, -4] - [6, -2] = [4, -2]; buf = g; new = [10, -4] - buf.
    x1 = aggregate(agg, {"w": t(10.0, -4.0)}, [upd("a", 1, w=t(6.0, -2.0))])
    assert_state(x1, {"w": [6.0, -2.0]})
    # Round 2: g = [6, -2] - [4, 0] = [2, -2]; buf = 0.5 * [4, -2] + [2, -2] = [4, -3];
    # new = [6, -2] - [4, -3] = [2, 1]   (plain FedAvg would give the mean [4, 0]).
    x2 = aggregate(agg, x1, [upd("a", 1, w=t(4.0, 0.0))])
    assert_state(x2, {"w": [2.0, 1.0]})
    assert agg.state_dict()["step"] == 2


def test_fedavgm_server_lr_scales_the_step() -> None:
    agg = FedAvgM(beta=0.5, server_lr=0.5)
    # Round 1: g = 10 - 6 = 4, buf = 4, new = 10 - 0.5 * 4 = 8.
    x1 = aggregate(agg, {"w": t(10.0)}, [upd("a", 1, w=t(6.0))])
    assert_state(x1, {"w": [8.0]})
    # Round 2: g = 8 - 6 = 2, buf = 0.5 * 4 + 2 = 4, new = 8 - 0.5 * 4 = 6.
    assert_state(aggregate(agg, x1, [upd("a", 1, w=t(6.0))]), {"w": [6.0]})


def test_fedavgm_round_one_reference_is_the_sent_global_state() -> None:
    agg = FedAvgM(beta=0.9, server_lr=0.5)
    updates = [upd("a", 2, w=t(6.0)), upd("b", 2, w=t(2.0))]  # mean 4
    # g = sent global - mean = 10 - 4 = 6; new = 10 - 0.5 * 6 = 7. Taking a client's result (6 or 2)
    # or the mean as the reference would give g = 0 and new = 6, 2 or 4.
    assert_state(aggregate(agg, {"w": t(10.0)}, updates), {"w": [7.0]})
    # The same updates against another sent state move from that state: g = 0 - 4, new = 2.
    assert_state(aggregate(FedAvgM(beta=0.9, server_lr=0.5), {"w": t(0.0)}, updates), {"w": [2.0]})


# --- FedAdam / FedYogi / FedAdagrad ---------------------------------------------------------
# Shared setup: server_lr = 1, beta1 = 0.5, tau = 2 (v starts at tau**2 = 4), beta2 = 0.75.
# Round 1: global [1, 1], mean [5, -1]: delta = [4, -2], delta**2 = [16, 4],
#          m = 0.5 * delta = [2, -1].
# Round 2: global x1, same mean [5, -1]: delta = [5, -1] - x1.


def _two_rounds(agg: Aggregator) -> tuple[State, State]:
    x1 = aggregate(agg, {"w": t(1.0, 1.0)}, [upd("a", 3, w=t(5.0, -1.0))])
    x2 = aggregate(agg, x1, [upd("a", 3, w=t(5.0, -1.0))])
    return x1, x2


def test_fedadam_two_steps() -> None:
    x1, x2 = _two_rounds(FedAdam(beta2=0.75, **ADAPTIVE))
    # v = 0.75 * 4 + 0.25 * [16, 4] = [7, 4]; x1 = 1 + [2, -1] / (sqrt(v) + 2)
    #   = [1 + 2 / 4.6457513, 1 - 1 / 4] = [1.4305009, 0.75]
    assert_state(x1, {"w": [1.4305009, 0.75]})
    # delta = [3.5694991, -1.75]; m = 0.5 * [2, -1] + 0.5 * delta = [2.7847496, -1.375]
    # v = 0.75 * [7, 4] + 0.25 * delta**2 = [8.4353310, 3.765625]
    # x2 = x1 + m / (sqrt(v) + 2) = [1.4305009 + 0.5678105, 0.75 - 0.3489386]
    #    = [1.9983114, 0.4010614]
    assert_state(x2, {"w": [1.9983114, 0.4010614]})


def test_fedyogi_two_steps() -> None:
    x1, x2 = _two_rounds(FedYogi(beta2=0.75, **ADAPTIVE))
    # v = 4 - 0.25 * [16, 4] * sign(4 - [16, 4]) = [4 + 4, 4 - 0] = [8, 4]
    # x1 = 1 + [2, -1] / (sqrt([8, 4]) + 2) = [1 + 1 / (sqrt(2) + 1), 0.75] = [sqrt(2), 0.75]
    assert_state(x1, {"w": [math.sqrt(2.0), 0.75]})
    # delta = [5 - sqrt(2), -1.75] = [3.5857864, -1.75]; m = [2.7928932, -1.375]
    # v = [8 + 0.25 * 12.857864 (8 < delta**2), 4 - 0.25 * 3.0625 (4 > delta**2)]
    #   = [11.214466, 3.234375]  (Adam would give 3.765625 for the second entry)
    # x2 = [1.4142136 + 2.7928932 / 5.3487987, 0.75 - 1.375 / 3.7984371] = [1.9363667, 0.3880090]
    assert_state(x2, {"w": [1.9363667, 0.3880090]})


def test_fedadagrad_two_steps() -> None:
    x1, x2 = _two_rounds(FedAdagrad(**ADAPTIVE))
    # v = 4 + [16, 4] = [20, 8]; x1 = 1 + [2 / (sqrt(20) + 2), -1 / (sqrt(8) + 2)]
    #   = [1.3090170, 0.7928932]
    assert_state(x1, {"w": [1.3090170, 0.7928932]})
    # delta = [3.6909830, -1.7928932]; m = 0.5 * m + 0.5 * delta = [2.8454915, -1.3964466]
    # v = [20 + 13.6233555, 8 + 3.2144661] = [33.6233555, 11.2144661]
    # x2 = [1.3090170 + 2.8454915 / 7.7985735, 0.7928932 - 1.3964466 / 5.3487987]
    #    = [1.6738907, 0.5318166]
    assert_state(x2, {"w": [1.6738907, 0.5318166]})


def test_adaptive_defaults_follow_reddi_et_al() -> None:
    def defaults(cls: type) -> dict[str, object]:
        params = inspect.signature(cls.__init__).parameters.values()
        return {p.name: p.default for p in params if p.name != "self"}

    adam = {"server_lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    assert defaults(FedAdam) == defaults(FedYogi) == adam
    # Reddi et al. Algorithm 2 gives FedAdagrad the momentum beta1 but no beta2.
    assert defaults(FedAdagrad) == {"server_lr": 1e-2, "beta1": 0.9, "tau": 1e-3}
    # One default FedAdam step with delta = 1: m = 0.1, v = 0.99 * 1e-6 + 0.01 = 0.01000099,
    # x = 0.01 * 0.1 / (sqrt(v) + 1e-3) = 0.001 / 0.1010049 = 0.0099005
    x1 = aggregate(FedAdam(), {"w": t(0.0)}, [upd("a", 1, w=t(1.0))])
    assert_state(x1, {"w": [0.01 * 0.1 / (math.sqrt(0.99e-6 + 0.01) + 1e-3)]}, rel=1e-5)


# --- checkpoints: state_dict / load_state_dict ----------------------------------------------

ROUND_TRIP = [
    ("fedavg", {}),
    ("fedavgm", {"beta": 0.5}),
    ("fedadam", {"beta2": 0.75, **ADAPTIVE}),
    ("fedyogi", {"beta2": 0.75, **ADAPTIVE}),
    ("fedadagrad", ADAPTIVE),
]


@pytest.mark.parametrize(("name", "params"), ROUND_TRIP)
def test_state_dict_round_trip_gives_identical_next_step(
    name: str, params: dict, tmp_path: Path
) -> None:
    first = build_aggregator(name, params)
    updates = [upd("a", 1, w=t(5.0, -1.0)), upd("b", 2, w=t(2.0, 3.0))]
    x1 = aggregate(first, {"w": t(1.0, 1.0)}, updates)
    saved = first.state_dict()
    torch.save(saved, tmp_path / "server_optimizer.pt")
    for value in saved.values():  # the returned tensors are copies: changing them is harmless
        if isinstance(value, dict):
            for tensor in value.values():
                tensor.add_(100.0)
    loaded = torch.load(tmp_path / "server_optimizer.pt")
    second = build_aggregator(name, params)
    second.load_state_dict(loaded)
    for value in loaded.values():  # and load_state_dict copies what it is given
        if isinstance(value, dict):
            for tensor in value.values():
                tensor.mul_(-3.0)
    assert second.state_dict().keys() == first.state_dict().keys()
    x2_first, x2_second = aggregate(first, x1, updates), aggregate(second, x1, updates)
    assert torch.equal(x2_first["w"], x2_second["w"])


def test_load_state_dict_from_another_aggregator_fails() -> None:
    fedavgm = FedAvgM()
    aggregate(fedavgm, {"w": t(1.0)}, [upd("a", 1, w=t(2.0))])
    with pytest.raises(AggregationError, match=r"FedAdam optimizer state is missing \['m', 'v'\]"):
        FedAdam().load_state_dict(fedavgm.state_dict())


# --- errors ---------------------------------------------------------------------------------

GLOBAL = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}


def _good(client_id: str = "ok", n: int = 1) -> ClientUpdate:
    return upd(client_id, n, w=torch.ones(2, 2), b=torch.ones(2))


BAD_UPDATES = [
    ([], r"no client updates"),
    ([_good("a", 0), _good("b", 0)],
     r"total num_examples of the updates is 0 \(clients \['a', 'b'\]\)"),
    ([_good("a", 2), _good("b", -1)], r"num_examples must be >= 0.*\['b'\]"),
    ([_good(), upd("c1", 1, w=torch.ones(2, 2))],
     r"client 'c1' .*missing \['b'\], unexpected \[\]"),
    ([_good(), upd("c2", 1, w=torch.ones(2, 2), b=torch.ones(2), z=torch.ones(1))],
     r"client 'c2' .*missing \[\], unexpected \['z'\]"),
    ([_good(), upd("c3", 1, w=torch.ones(2, 3), b=torch.ones(2))],
     r"client 'c3' does not match the global state: tensor 'w' has shape \(2, 3\), expected \(2, 2\)"),
]


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize(("updates", "message"), BAD_UPDATES)
def test_bad_updates_raise_aggregation_error(name: str, updates: list, message: str) -> None:
    with pytest.raises(AggregationError, match=message):
        aggregate(build_aggregator(name, {}), GLOBAL, updates)


def test_weighted_mean_checks_clients_against_each_other() -> None:
    with pytest.raises(AggregationError, match=r"client 'c3' does not match the global state: tensor 'w' has shape \(2, 3\)"):
        weighted_mean([_good(), upd("c3", 1, w=torch.ones(2, 3), b=torch.ones(2))])


@pytest.mark.parametrize("name", ALL_NAMES)
def test_step_checks_the_mean_state(name: str) -> None:
    with pytest.raises(AggregationError, match=r"the mean of the client updates .*missing \['b'\]"):
        build_aggregator(name, {}).step(GLOBAL, {"w": torch.ones(2, 2)})


@pytest.mark.parametrize(
    ("name", "buffer"), [("fedavgm", "momentum buffer"), ("fedadam", "first moment")]
)
def test_state_keys_changing_between_rounds_fail(name: str, buffer: str) -> None:
    agg = build_aggregator(name, {})
    aggregate(agg, {"w": t(1.0)}, [upd("a", 1, w=t(2.0))])
    with pytest.raises(AggregationError, match=buffer):
        aggregate(agg, {"v": t(1.0)}, [upd("a", 1, v=t(2.0))])


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (FedAvgM, {"beta": -1}, "`beta` must be in [0, 1), got -1"),
        (FedAvgM, {"beta": 1.0}, "`beta` must be in [0, 1), got 1"),
        (FedAvgM, {"server_lr": 0.0}, "`server_lr` must be > 0, got 0"),
        (FedAdam, {"beta2": 1.5}, "`beta2` must be in [0, 1), got 1.5"),
        (FedAdam, {"tau": 0.0}, "`tau` must be > 0, got 0"),
        (FedYogi, {"beta1": float("nan")}, "`beta1` must be in [0, 1), got nan"),
        (FedAdagrad, {"server_lr": -0.1}, "`server_lr` must be > 0, got -0.1"),
    ],
)
def test_out_of_range_hyperparameters(cls: type, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        cls(**kwargs)
    assert str(info.value) == message


# --- registry, build_aggregator, plugins, params --------------------------------------------


def test_registered_names_and_build() -> None:
    assert AGGREGATORS.names() == sorted(ALL_NAMES + ROBUST_NAMES)
    agg = build_aggregator("FedAvgM", {"beta": "0.25", "server_lr": 2})  # YAML-ish values coerce
    assert isinstance(agg, FedAvgM) and isinstance(agg, Aggregator)
    assert (agg.beta, agg.server_lr) == (0.25, 2.0)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(RegistryError) as info:
        build_aggregator("fedadm", {})
    message = str(info.value)
    assert "'fedadm'" in message and "Did you mean 'fedadam'?" in message
    for name in ALL_NAMES:
        assert name in message


def test_build_rejects_bad_params() -> None:
    expected = r"beta: Input should be a valid number.*'high'.*Valid: beta, server_lr"
    with pytest.raises(ConfigError, match=expected):
        build_aggregator("fedavgm", {"beta": "high"})
    with pytest.raises(ConfigError, match=r"momentum: Extra inputs are not permitted"):
        build_aggregator("fedavgm", {"momentum": 0.9})


def test_param_errors_catches_bad_hyperparameter_types() -> None:
    [(loc, msg, value)] = param_errors(FedAvgM, {"beta": "high"})
    assert loc == ("beta",) and "valid number" in msg and value == "high"
    assert param_errors(FedAdam, {"beta1": 0.8, "tau": 1e-2}) == []
    [(loc, msg, _)] = param_errors(FedAdagrad, {"beta2": 0.99})  # Adagrad has no beta2
    assert loc == ("beta2",) and "Extra inputs" in msg


PLUGIN = '''
"""A user aggregator: move a fixed fraction of the way to the weighted mean."""


class MyAgg:
    def __init__(self, mix: float = 0.5) -> None:
        self.mix = mix

    def step(self, global_state, mean_state):
        return {k: (1 - self.mix) * v + self.mix * mean_state[k] for k, v in global_state.items()}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass
'''


def test_plugin_aggregator_from_python_file(tmp_path: Path) -> None:
    path = tmp_path / "my_agg.py"
    path.write_text(PLUGIN)
    cls = AGGREGATORS.get(f"{path}:MyAgg")
    assert cls.__name__ == "MyAgg"
    agg = build_aggregator(f"{path}:MyAgg", {"mix": 0.25})
    assert isinstance(agg, Aggregator)
    # 0.75 * 8 + 0.25 * 4 = 7
    assert_state(aggregate(agg, {"w": t(8.0)}, [upd("a", 1, w=t(4.0))]), {"w": [7.0]})
    assert param_errors(cls, {"mix": "lots"})[0][0] == ("mix",)
    with pytest.raises(RegistryError, match="has no object 'Nope'"):
        AGGREGATORS.get(f"{path}:Nope")
