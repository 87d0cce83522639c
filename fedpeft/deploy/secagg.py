"""SecAgg+ for the Flower deployment: the server learns only the sample-weighted mean.

flwr 1.42 ships SecAgg+ only for the *legacy* stack: ``flwr.server.workflow.SecAggPlusWorkflow``
needs a ``LegacyContext`` holding a legacy ``Strategy`` and a ``ClientManager``, and it speaks the
FitIns/FitRes record layout (``fitins.parameters``, ``fitres.num_examples``, ...). The client side
is ``flwr.client.mod.secaggplus_mod``. This module adapts both to fedpeft:

- Server: :func:`secure_weighted_mean` runs the workflow for one round with a tiny capture
  strategy, and returns the weighted mean that the workflow unmasks. fedpeft then applies its own
  ``Aggregator.step(global_state, mean)`` (every fedpeft aggregator needs only that mean).
- Client: :func:`optional_secaggplus_mod` applies ``secaggplus_mod`` only to SecAgg+ messages, and
  :func:`fit_legacy` turns a FitIns message into a FitRes reply around a ``State -> ClientUpdate``
  function.

What the workflow computes (flwr/server/workflow/secure_aggregation/secaggplus_workflow.py and
flwr/client/mod/secure_aggregation/secaggplus_mod.py): client i sends
``quantize(clip(w_i * d_i, -c, c))`` with ``w_i = round(n_i / max_weight * Q) / Q``, plus the
quantised weight; the server unmasks the sums and returns ``sum_i w_i d_i / sum_i w_i``, i.e. the
num_examples-weighted mean. Here ``d_i`` is the client's *delta* ``x_i - global`` (small, so a
tight clipping range keeps the quantisation step ``2c/Q`` small); the server adds the global state
back. ``num_examples`` itself travels in clear in ``fitres.num_examples``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.server_config import ServerConfig
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedpeft.deploy.constants import KEY_SERVER_ROUND
from fedpeft.deploy.records import state_to_record
from fedpeft.errors import RoundError
from fedpeft.types import ClientUpdate, State

logger = logging.getLogger(__name__)

FITINS_KEYS = "state-keys"  # FitIns config: the State keys, "\n"-joined (legacy arrays are unnamed)
_FITINS_PARAMETERS = "fitins.parameters"


@dataclass
class SecAggSettings:
    """SecAgg+ parameters (see ``SecAggPlusWorkflow``).

    Attributes:
        clipping_range: Each client clips ``num_examples / max_weight * (param - global)`` to
            +-this (the update delta; ``w <= 1`` so ``c >= max |delta|`` never clips).
        quantization_range: Integer levels over ``[-clip, clip]``; step is ``2*clip/Q``.
        max_weight: Largest allowed ``num_examples`` (larger ones overflow; a warning is logged).
        num_shares: Shares per secret (float: fraction of sampled clients).
        reconstruction_threshold: Shares needed to unmask (float: fraction of ``num_shares``).
        timeout: Seconds each of the four stages waits for replies (None: forever).
    """

    clipping_range: float = 8.0
    quantization_range: int = 4194304
    max_weight: float = 1000.0
    num_shares: float = 1.0
    reconstruction_threshold: float = 0.7
    timeout: float | None = 120.0


@dataclass
class _MeanCapture(Strategy):
    """Legacy strategy that hands every sampled node the state and keeps the unmasked mean."""

    keys: list[str]
    server_round: int
    mean: list[np.ndarray] | None = None
    total_examples: int = 0
    client_metrics: list[dict] = field(default_factory=list)

    def initialize_parameters(self, client_manager):  # noqa: D102 - unused by the workflow
        return None

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: D102
        config = {FITINS_KEYS: "\n".join(self.keys), KEY_SERVER_ROUND: self.server_round}
        return [(proxy, FitIns(parameters, config)) for proxy in client_manager.all().values()]

    def aggregate_fit(self, server_round, results, failures):  # noqa: D102
        if not results:
            return None, {}
        # The workflow put the unmasked weighted mean into every result's parameters.
        self.mean = parameters_to_ndarrays(results[0][1].parameters)
        self.total_examples = sum(res.num_examples for _, res in results)
        self.client_metrics = [dict(res.metrics, num_examples=res.num_examples) for _, res in results]
        return results[0][1].parameters, {}

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: D102
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: D102
        return None, {}

    def evaluate(self, server_round, parameters):  # noqa: D102
        return None


def secure_weighted_mean(grid: Grid, context: Context, state: State, node_ids: list[int],
                         server_round: int, settings: SecAggSettings) -> tuple[State, int, list[dict]]:
    """Run one SecAgg+ round and return the clients' num_examples-weighted mean.

    Args:
        grid: The ServerApp's grid.
        context: The ServerApp's context (its state is not modified).
        state: The global state to send.
        node_ids: SuperNodes to sample (at least 2; SecAgg+ refuses fewer).
        server_round: 1-based round number (the messages' group id).
        settings: SecAgg+ parameters.

    Returns:
        ``(mean_state, total_examples, client_metrics)``; ``total_examples`` is the sum of the
        surviving clients' num_examples (sent in clear by the protocol).

    Raises:
        RoundError: if the protocol halted (too few nodes replied at some stage).
    """
    keys = list(state)
    strategy = _MeanCapture(keys=keys, server_round=server_round)
    clients = SimpleClientManager()
    for nid in node_ids:
        clients.register(GridClientProxy(nid, grid, context.run_id))
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=1), strategy=strategy,
                           client_manager=clients)
    legacy.state = RecordDict()  # LegacyContext shares context.state; keep the caller's clean
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: server_round})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = state_to_record(state)
    workflow = SecAggPlusWorkflow(
        num_shares=settings.num_shares, reconstruction_threshold=settings.reconstruction_threshold,
        max_weight=settings.max_weight, clipping_range=settings.clipping_range,
        quantization_range=settings.quantization_range, timeout=settings.timeout)
    workflow(grid, legacy)
    if strategy.mean is None:
        raise RoundError(
            f"SecAgg+ halted in round {server_round} with {len(node_ids)} nodes: too few replies at "
            "some stage (see the ServerApp log). Raise secagg timeout or add nodes.")
    # Clients sent deltas (see fit_legacy); the weights sum to one, so mean(x) = g + mean(x - g).
    mean = {k: state[k] + torch.from_numpy(np.asarray(a)).to(torch.float32)
            for k, a in zip(keys, strategy.mean, strict=True)}
    return mean, strategy.total_examples, strategy.client_metrics


def optional_secaggplus_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """``secaggplus_mod`` for SecAgg+ messages only; plain messages pass straight through."""
    if msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def is_legacy_fitins(msg: Message) -> bool:
    """Whether ``msg`` carries the legacy FitIns layout that SecAgg+ uses."""
    return _FITINS_PARAMETERS in msg.content.array_records


def fit_legacy(msg: Message, fit_fn: Callable[[State], ClientUpdate]) -> Message:
    """Answer a SecAgg+ FitIns message with a FitRes reply, training with ``fit_fn``.

    ``secaggplus_mod`` then replaces the reply's parameters by the masked, quantised vector.
    """
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    keys = str(fitins.config[FITINS_KEYS]).split("\n")
    arrays = parameters_to_ndarrays(fitins.parameters)
    state = {k: torch.from_numpy(a.copy()).to(torch.float32) for k, a in zip(keys, arrays, strict=True)}
    update = fit_fn(state)
    # Send the delta, not the state: deltas are small, so a tight clipping range keeps the
    # quantisation step (2 * clip / Q) small. The server adds the global state back.
    deltas = [(update.state[k].detach().to(torch.float32) - state[k]).numpy() for k in keys]
    params: Parameters = ndarrays_to_parameters(deltas)
    metrics = {k: v for k, v in update.metrics.items() if isinstance(v, (int, float, str, bytes))}
    fitres = FitRes(status=Status(Code.OK, ""), parameters=params,
                    num_examples=update.num_examples, metrics=metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
