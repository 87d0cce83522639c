"""SecAgg+ on the server: run Flower's workflow for one round, keep only the weighted mean.

flwr 1.42 ships SecAgg+ only for the *legacy* stack: ``flwr.server.workflow.SecAggPlusWorkflow``
needs a ``LegacyContext`` holding a legacy ``Strategy`` and a ``ClientManager``, and speaks the
FitIns/FitRes layout. :func:`secure_mean` runs it with a capture strategy that hands each
sampled site its own FitIns (site name, seed, job) and keeps the unmasked mean; fedpeft then
applies its own ``Aggregator.step(global_state, mean)``. The site side is
``fedpeft.deploy.client_app.optional_secaggplus_mod`` and ``fedpeft.deploy.site_training``.

What the workflow computes: site i sends ``quantize(clip(w_i * d_i, -c, c))`` with
``w_i = round(n_i / max_weight * Q) / Q`` and ``d_i = x_i - global`` (its delta), masked mod
2**32; the server unmasks the sum and returns ``sum_i w_i d_i / sum_i w_i``: the
num_examples-weighted mean. ``num_examples`` and the scalar training metrics travel in clear.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common import FitIns, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.server_config import ServerConfig
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedpeft.deploy.records import state_to_record
from fedpeft.deploy.settings import SecAggConfig
from fedpeft.errors import RoundError


class SecAggHalted(RoundError):
    """The protocol stopped: a site was lost before enough key shares were out (nothing usable)."""
from fedpeft.state import State

log = logging.getLogger(__name__)


@dataclass
class SiteResult:
    """What SecAgg+ reveals about one site: its example count and scalar metrics."""

    node_id: int
    num_examples: int
    metrics: dict[str, Any]


@dataclass
class _MeanCapture(Strategy):
    """Legacy strategy: one FitIns per sampled node; keeps the unmasked mean."""

    fitins_config: dict[int, dict[str, Any]]  # node id -> FitIns config
    mean: list[np.ndarray] | None = None
    results: list[SiteResult] = field(default_factory=list)

    def initialize_parameters(self, client_manager):  # noqa: D102 - unused by the workflow
        return None

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: D102
        proxies = client_manager.all()
        return [(proxies[str(nid)], FitIns(parameters, cfg)) for nid, cfg in self.fitins_config.items()]

    def aggregate_fit(self, server_round, results, failures):  # noqa: D102
        if not results:
            return None, {}
        # The workflow wrote the same unmasked weighted mean into every result's parameters.
        self.mean = parameters_to_ndarrays(results[0][1].parameters)
        self.results = [SiteResult(proxy.node_id, res.num_examples, dict(res.metrics))
                        for proxy, res in results]
        return results[0][1].parameters, {}

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: D102
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: D102
        return None, {}

    def evaluate(self, server_round, parameters):  # noqa: D102
        return None


def secure_mean(grid: Grid, context: Context, state: State, fitins_config: dict[int, dict[str, Any]],
                rnd: int, settings: SecAggConfig, timeout_s: float) -> tuple[State, list[SiteResult]]:
    """Run one SecAgg+ round; return the sites' num_examples-weighted mean state.

    Args:
        grid: The ServerApp's grid (each stage waits at most ``timeout_s``, and all four
            together at most the round's deadline: :meth:`CountingGrid.round_deadline`).
        context: The ServerApp's context (its state is left untouched).
        state: The global state to send.
        fitins_config: Node id -> that node's FitIns config (site, seed, job, state keys).
        rnd: 1-based round (the messages' group id).
        settings: SecAgg+ parameters.
        timeout_s: Seconds each of the four stages waits for replies.

    Raises:
        RoundError: if the protocol halted (too few replies at some stage) or a site's
            num_examples exceeds ``max_weight`` (its weight would overflow).
    """
    strategy = _MeanCapture(fitins_config)
    clients = SimpleClientManager()
    for nid in fitins_config:
        clients.register(GridClientProxy(nid, grid, context.run_id))
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=1), strategy=strategy,
                           client_manager=clients)
    legacy.state = RecordDict()  # LegacyContext shares context.state; keep the caller's clean
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = state_to_record(state)
    SecAggPlusWorkflow(
        num_shares=settings.num_shares, reconstruction_threshold=settings.reconstruction_threshold,
        max_weight=settings.max_weight, clipping_range=settings.clipping_range,
        quantization_range=settings.quantization_range, timeout=timeout_s)(grid, legacy)
    if strategy.mean is None:
        raise SecAggHalted(f"round {rnd}: SecAgg+ halted with {len(fitins_config)} sites (too few "
                         "replies at some stage; see the server log)")
    over = [r.num_examples for r in strategy.results if r.num_examples > settings.max_weight]
    if over:
        raise RoundError(f"round {rnd}: a site trained on {max(over)} examples, above "
                         f"secure_aggregation.max_weight={settings.max_weight:g}: its weight "
                         f"overflowed and the mean is wrong; set max_weight >= {max(over)}")
    keys = list(state)
    # Sites sent deltas; the weights sum to one, so mean(x) = global + mean(x - global).
    mean = {k: state[k] + torch.from_numpy(np.asarray(a)).to(torch.float32)
            for k, a in zip(keys, strategy.mean, strict=True)}
    return mean, strategy.results


def error_bound(settings: SecAggConfig, num_examples: list[int], max_abs_delta: float,
                max_abs_state: float) -> float:
    """Worst-case absolute error of one value of SecAgg+'s mean against the exact weighted mean.

    Three terms: stochastic rounding (each site's value is off by less than one step
    ``2c/Q``, and the sum is divided by the total weight), the rounding of each weight
    ``n_i / max_weight`` to a multiple of ``1/Q``, and float32 rounding (the deltas, and the
    global state added back to their mean).

    Args:
        settings: The SecAgg+ settings (``c = clipping_range``, ``Q = quantization_range``).
        num_examples: Training examples of each site that contributed.
        max_abs_delta: Largest ``|x_i - global|`` of any site (a clip range never exceeded).
        max_abs_state: Largest ``|value|`` of the global state or the mean.

    Returns:
        The bound on ``|secure mean - exact mean|`` per value (typically 1e-7 or less).
    """
    q, m = settings.quantization_range, settings.max_weight
    total_weight = sum(n / m for n in num_examples)
    rounding = len(num_examples) * (2 * settings.clipping_range / q) / total_weight
    weights = 2 * max_abs_delta * max(0.5 / (n / m * q) for n in num_examples)
    eps = float(np.finfo(np.float32).eps)
    return rounding + weights + eps * (max_abs_state + max_abs_delta)


def expected_noise_std(settings: SecAggConfig, num_examples: list[int]) -> float:
    """Typical (one standard deviation) error per value: stochastic rounding is unbiased."""
    step = 2 * settings.clipping_range / settings.quantization_range
    total_weight = sum(n / settings.max_weight for n in num_examples)
    return step * math.sqrt(len(num_examples) / 6) / total_weight
