"""The seed's Ianvs aggregation files (tests/benchmark/ianvs_plugins/FedAvg-PEFT.py, FedAvgM-PEFT.py,
re-typed unchanged) as fedpeft aggregators: same results as the built-ins, hyperparameters checked,
state checkpointed."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch

from fedpeft.aggregators import AGGREGATORS, aggregate, build_aggregator, weighted_mean
from fedpeft.errors import ConfigError
from fedpeft.params import valid_params
from fedpeft.state import ClientUpdate, State

PLUGINS = Path(__file__).parent / "benchmark" / "ianvs_plugins"
FEDAVG = f"{PLUGINS / 'FedAvg-PEFT.py'}:FedAvg-PEFT"
FEDAVGM = f"{PLUGINS / 'FedAvgM-PEFT.py'}:FedAvgM-PEFT"
MOMENTUM = {"beta": 0.7, "server_lr": 0.8}  # server_lr != 1: the first round shows the seed's quirk too


def _global(seed: int = 999) -> State:
    g = torch.Generator().manual_seed(seed)
    return {"q.lora_A": torch.randn(2, 3, generator=g), "q.lora_B": torch.randn(3, 2, generator=g)}


def _rounds(n: int = 3) -> list[list[ClientUpdate]]:
    """``n`` rounds of 3 clients with unequal sample counts."""
    return [[ClientUpdate(f"client-{c}", _global(10 * r + c), num_examples=5 + 3 * c) for c in range(3)]
            for r in range(n)]


def _run(aggregator, start: State, rounds: list[list[ClientUpdate]], secure: bool = False) -> list[State]:
    states, state = [], start
    for updates in rounds:
        state = (aggregate(aggregator, state, mean=weighted_mean(updates)) if secure
                 else aggregate(aggregator, state, updates))
        states.append(state)
    return states


def _close(a: list[State], b: list[State]) -> bool:
    return all(torch.allclose(x[k], y[k], atol=1e-6) for x, y in zip(a, b) for k in x)


@pytest.mark.parametrize("secure", [False, True])
def test_seed_fedavg_peft_gives_fedavg(secure):
    rounds = _rounds()
    seed = _run(build_aggregator(FEDAVG, {}), _global(), rounds, secure)
    assert _close(seed, _run(build_aggregator("fedavg", {}), _global(), rounds))
    assert not _close(seed[:1], [rounds[0][0].state])  # not a copy of one client
    assert [n for n in sys.modules if n.split(".")[0] in ("sedna", "core")] == []


def test_seed_fedavgm_peft_is_fedavgm_started_from_the_first_clients_weights():
    # The seed's quirk: in its first round `self.weights` is None, so it starts from
    # clients[0].weights instead of the global adapter the clients trained from. From there on it
    # is fedpeft's fedavgm (torch.optim.SGD momentum on global - weighted mean).
    rounds = _rounds()
    seed = _run(build_aggregator(FEDAVGM, MOMENTUM), _global(), rounds)
    quirk = _run(build_aggregator("fedavgm", MOMENTUM), rounds[0][0].state, rounds)
    assert _close(seed, quirk)
    assert not _close(seed, _run(build_aggregator("fedavgm", MOMENTUM), _global(), rounds))


def test_plugin_hyperparameters_are_its_init_keywords():
    assert valid_params(AGGREGATORS.get(FEDAVGM)) == ["beta", "server_lr"]
    assert build_aggregator(FEDAVGM, {"beta": 0.5}).plugin.beta == 0.5
    with pytest.raises(ConfigError, match="betta"):
        build_aggregator(FEDAVGM, {"betta": 0.5})


def test_plugin_state_survives_a_checkpoint_so_a_resumed_run_is_exact():
    rounds = _rounds(3)
    straight = build_aggregator(FEDAVGM, MOMENTUM)
    states = _run(straight, _global(), rounds[:2])
    buffer = io.BytesIO()
    torch.save(straight.state_dict(), buffer)
    buffer.seek(0)
    resumed = build_aggregator(FEDAVGM, MOMENTUM)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    fresh = build_aggregator(FEDAVGM, MOMENTUM)
    expected = _run(straight, states[-1], rounds[2:])[0]
    got = _run(resumed, states[-1], rounds[2:])[0]
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not _close(_run(fresh, states[-1], rounds[2:]), [expected])  # the weights and moments matter
