"""Flower ``ServerApp`` and ``ClientApp`` (flwr 1.42 Message API) around the fedpeft core.

``flwr run`` loads ``server_app`` in a ``flwr-serverapp`` process started by the SuperLink's
SuperExec, and ``client_app`` in a fresh ``flwr-clientapp`` process per message on each
SuperNode. Both import this module, so ``fedpeft`` must be importable there (the launcher puts
the repository on ``PYTHONPATH``; runtime dependency installation is disabled).

Wire format, one message per client per round (``message_type="train"``, ``group_id=round``):
server -> client ``RecordDict({"state": ArrayRecord, "config": ConfigRecord})``; client -> server
``RecordDict({"state": ArrayRecord, "metrics": MetricRecord, "config": ConfigRecord})``. With
``secure-aggregation = true`` the SecAgg+ workflow's legacy layout is used instead
(:mod:`fedpeft.deploy.secagg`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save_file

from fedpeft.aggregators import build_aggregator, weighted_mean
from fedpeft.constants import (
    KEY_BYTES_DOWN,
    KEY_BYTES_UP,
    KEY_CLIENT_ID,
    KEY_EVENT,
    KEY_NUM_EXAMPLES,
    KEY_ROUND,
    KEY_SECONDS,
    EVENT_ROUND,
)
from fedpeft.deploy import placeholder, secagg
from fedpeft.deploy import constants as C
from fedpeft.deploy.records import message_nbytes, record_to_state, state_to_record
from fedpeft.errors import RoundError
from fedpeft.io_utils import append_jsonl, write_json
from fedpeft.types import ClientUpdate, State

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- client side

client_app = ClientApp(mods=[secagg.optional_secaggplus_mod])


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this node's data, starting from the state in ``msg``."""
    client_id = str(context.node_config.get(C.NODE_CLIENT_ID, context.node_id))
    examples = placeholder.load_examples(str(context.node_config[C.NODE_DATA_PATH]))

    def fit(global_state: State) -> ClientUpdate:
        # REPLACE with fedpeft.trainer.fit(model, tokenizer, examples, cfg.train, global_state,
        # seed); load the model in a ClientApp lifespan or per message (see deploy-notes.md).
        return placeholder.placeholder_fit(global_state, examples, client_id)

    if secagg.is_legacy_fitins(msg):
        return secagg.fit_legacy(msg, fit)
    update = fit(record_to_state(msg.content.array_records[C.RECORD_STATE]))
    numeric = {k: v for k, v in update.metrics.items() if isinstance(v, (int, float))}
    content = RecordDict({
        C.RECORD_STATE: state_to_record(update.state),
        C.RECORD_METRICS: MetricRecord({**numeric, KEY_NUM_EXAMPLES: update.num_examples}),
        C.RECORD_CONFIG: ConfigRecord({KEY_CLIENT_ID: update.client_id}),
    })
    return Message(content, reply_to=msg)


# ----------------------------------------------------------------------------- server side

server_app = ServerApp()


@dataclass(frozen=True)
class DeploySettings:
    """The run config the ServerApp reads (keys in :mod:`fedpeft.deploy.constants`)."""

    num_rounds: int
    min_nodes: int
    node_wait_s: float
    round_timeout_s: float
    min_replies: int
    aggregation: str
    output_dir: Path
    secure_aggregation: bool
    secagg: secagg.SecAggSettings
    init_seed: int

    @classmethod
    def from_run_config(cls, cfg: dict) -> DeploySettings:
        """Read the settings, with defaults for everything but ``output-dir``."""
        timeout = float(cfg.get(C.RUN_ROUND_TIMEOUT_S, 600.0))
        return cls(
            num_rounds=int(cfg.get(C.RUN_NUM_ROUNDS, 2)),
            min_nodes=int(cfg.get(C.RUN_MIN_NODES, 2)),
            node_wait_s=float(cfg.get(C.RUN_NODE_WAIT_S, 60.0)),
            round_timeout_s=timeout,
            min_replies=int(cfg.get(C.RUN_MIN_REPLIES, 1)),
            aggregation=str(cfg.get(C.RUN_AGGREGATION, "fedavg")),
            output_dir=Path(str(cfg[C.RUN_OUTPUT_DIR])),
            secure_aggregation=bool(cfg.get(C.RUN_SECAGG, False)),
            secagg=secagg.SecAggSettings(
                clipping_range=float(cfg.get(C.RUN_SECAGG_CLIP, 8.0)),
                quantization_range=int(cfg.get(C.RUN_SECAGG_QRANGE, 4194304)),
                max_weight=float(cfg.get(C.RUN_SECAGG_MAX_WEIGHT, 1000.0)),
                timeout=timeout),
            init_seed=int(cfg.get(C.RUN_INIT_SEED, 0)),
        )


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Round loop: wait for nodes -> send state -> weighted mean -> aggregator step -> record."""
    _log_to_stderr()
    cfg = DeploySettings.from_run_config(dict(context.run_config))
    aggregator = build_aggregator(cfg.aggregation, {})
    state = placeholder.initial_state(cfg.init_seed)  # REPLACE: trainable state of the PEFT model
    node_ids = wait_for_nodes(grid, cfg.min_nodes, cfg.node_wait_s)
    metrics_path = cfg.output_dir / C.DEPLOY_METRICS_FILE
    for rnd in range(1, cfg.num_rounds + 1):
        start = time.perf_counter()
        if cfg.secure_aggregation:
            mean, total, clients = secagg.secure_weighted_mean(grid, context, state, node_ids,
                                                               rnd, cfg.secagg)
            traffic = {}
        else:
            mean, total, clients, traffic = plain_weighted_mean(grid, state, node_ids, rnd, cfg)
        state = aggregator.step(state, mean)
        seconds = time.perf_counter() - start
        append_jsonl(metrics_path, {KEY_EVENT: EVENT_ROUND, KEY_ROUND: rnd, KEY_NUM_EXAMPLES: total,
                                    "clients": clients, KEY_SECONDS: seconds, **traffic})
        logger.info("[round %d/%d] %d clients, %d examples, %.1fs", rnd, cfg.num_rounds,
                    len(clients), total, seconds)
    save_file({k: v.contiguous() for k, v in state.items()}, str(cfg.output_dir / C.DEPLOY_STATE_FILE))
    write_json(cfg.output_dir / C.DEPLOY_SUMMARY_FILE,
               {"rounds": cfg.num_rounds, "nodes": sorted(node_ids),
                "secure_aggregation": cfg.secure_aggregation, "aggregation": cfg.aggregation})


def _log_to_stderr() -> None:
    """Show fedpeft's INFO logs in ``flwr log``: flwr-serverapp forwards stdout/stderr only."""
    pkg = logging.getLogger("fedpeft")
    if not pkg.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        pkg.addHandler(handler)
        pkg.setLevel(logging.INFO)


def wait_for_nodes(grid: Grid, min_nodes: int, wait_s: float) -> list[int]:
    """Poll the SuperLink until ``min_nodes`` SuperNodes are connected (bounded by ``wait_s``).

    Raises:
        RoundError: if fewer than ``min_nodes`` nodes connected in time.
    """
    deadline = time.monotonic() + wait_s
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= min_nodes or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if len(node_ids) < min_nodes:
        raise RoundError(f"only {len(node_ids)} SuperNodes connected within {wait_s:.0f}s, "
                         f"expected at least {min_nodes} ({C.RUN_MIN_NODES}); are they running?")
    return node_ids


def plain_weighted_mean(grid: Grid, state: State, node_ids: list[int], rnd: int,
                        cfg: DeploySettings) -> tuple[State, int, list[dict], dict]:
    """Send ``state`` to every node, collect updates, return their weighted mean.

    Returns:
        ``(mean, total_examples, per_client_metrics, traffic_bytes)``.

    Raises:
        RoundError: if fewer than ``min-replies`` clients answered without error in time.
    """
    content = RecordDict({C.RECORD_STATE: state_to_record(state),
                          C.RECORD_CONFIG: ConfigRecord({C.KEY_SERVER_ROUND: rnd})})
    out = [Message(content, nid, MessageType.TRAIN, group_id=str(rnd)) for nid in node_ids]
    replies = list(grid.send_and_receive(out, timeout=cfg.round_timeout_s))
    updates = []
    for reply in replies:
        if reply.has_error():
            logger.warning("[round %d] node %d failed: %s", rnd, reply.metadata.src_node_id,
                           reply.error.reason)
            continue
        m = reply.content.metric_records[C.RECORD_METRICS]
        cid = str(reply.content.config_records[C.RECORD_CONFIG][KEY_CLIENT_ID])
        updates.append(ClientUpdate(cid, record_to_state(reply.content.array_records[C.RECORD_STATE]),
                                    int(m[KEY_NUM_EXAMPLES]), dict(m)))
    missing = len(node_ids) - len(replies)
    if missing:
        logger.warning("[round %d] %d of %d nodes did not reply within %.0fs", rnd, missing,
                       len(node_ids), cfg.round_timeout_s)
    if len(updates) < cfg.min_replies:
        raise RoundError(f"round {rnd}: {len(updates)} successful replies from {len(node_ids)} "
                         f"nodes, need {cfg.min_replies} ({C.RUN_MIN_REPLIES})")
    traffic = {KEY_BYTES_DOWN: sum(message_nbytes(m) for m in out),
               KEY_BYTES_UP: sum(message_nbytes(r) for r in replies)}
    clients = [{KEY_CLIENT_ID: u.client_id, **u.metrics} for u in updates]
    return weighted_mean(updates), sum(u.num_examples for u in updates), clients, traffic
