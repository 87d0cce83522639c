"""One site's training step: the core's ``fit`` on the site's own file, for one message.

Imported by :mod:`fedpeft.deploy.client_app` only when a training message arrives (torch,
transformers and peft are slow to import). The site trains exactly like client ``i`` of the
simulation: same model and seeded adapter (``fedpeft.loop.build_worker``), same rows
(:func:`fedpeft.deploy.wire.site_rows`), same seed (sent by the server:
``fedpeft.loop.client_seed(cfg, round, i)``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from fedpeft.constants import KEY_CLIENT_ID, KEY_NUM_EXAMPLES
from fedpeft.data.prompts import tokenize_examples
from fedpeft.deploy import constants as C
from fedpeft.deploy.client_app import site_name
from fedpeft.deploy.records import record_to_state, state_to_record
from fedpeft.deploy.wire import site_job_from_payload, site_rows
from fedpeft.errors import ConfigError
from fedpeft.loop import build_worker
from fedpeft.models import resolve_devices
from fedpeft.trainer import fit
from fedpeft.types import ClientUpdate, State

log = logging.getLogger(__name__)

_LEGACY_PARAMETERS = "fitins.parameters"  # FitIns layout: what SecAgg+'s workflow sends


def handle_train(msg: Message, context: Context) -> Message:
    """Answer a training message: plain layout, or SecAgg+'s legacy FitIns layout."""
    if _LEGACY_PARAMETERS in msg.content.array_records:
        return _train_legacy(msg, context)
    config = msg.content.config_records[C.RECORD_CONFIG]
    update = train_site(config, record_to_state(msg.content.array_records[C.RECORD_STATE]), context)
    numeric = {k: v for k, v in update.metrics.items() if isinstance(v, (int, float))}
    text = {k: str(v) for k, v in update.metrics.items() if not isinstance(v, (int, float))}
    return Message(RecordDict({
        C.RECORD_STATE: state_to_record(update.state),
        C.RECORD_METRICS: MetricRecord({**numeric, KEY_NUM_EXAMPLES: update.num_examples}),
        C.RECORD_CONFIG: ConfigRecord({**text, KEY_CLIENT_ID: update.client_id}),
    }), reply_to=msg)


def train_site(config: Mapping[str, Any], global_state: State, context: Context) -> ClientUpdate:
    """Train this site's adapter from ``global_state`` as the server's ``config`` says.

    Args:
        config: ``site`` (the name the server expects), ``seed``, ``job`` (JSON).
        global_state: The global adapter the server sent.
        context: The ClientApp context; its node config names this site's data file.

    Raises:
        ConfigError: if the message is meant for another site or the job cannot be read.
        DataError: if the site's file is unusable.
    """
    name = site_name(context)
    if str(config[C.KEY_SITE]) != name:
        raise ConfigError(f"the server sent site {config[C.KEY_SITE]!r}'s task to site {name!r}; "
                          "two sites may share a name or a key")
    cfg, holdout = site_job_from_payload(str(config[C.KEY_JOB]))
    rows = site_rows(cfg, str(context.node_config[C.NODE_DATA_PATH]), holdout)
    device = str(context.node_config.get(C.NODE_DEVICE) or resolve_devices(cfg.model.devices)[0])
    worker = build_worker(cfg, device)
    examples = tokenize_examples(worker.tokenizer, rows, cfg.data.max_seq_len, cfg.data.system_prompt)
    log.info("site %s: round %s, %d examples on %s", name, config.get(C.KEY_SERVER_ROUND),
             len(examples), device)
    return fit(worker.model, examples, cfg.train, global_state, seed=int(config[C.KEY_SEED]),
               pad_token_id=worker.tokenizer.pad_token_id, client_id=name, progress=False)


def _train_legacy(msg: Message, context: Context) -> Message:
    """Answer SecAgg+'s "collect masked vectors" stage (FitIns in, FitRes out).

    The site sends its *delta* ``x_i - global``, not its state: deltas are small, so a tight
    clipping range keeps the quantisation step ``2 * clip / Q`` small. The server adds the global
    state back. ``secaggplus_mod`` then masks and quantises the reply's parameters.
    """
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = fitins.config
    keys = str(config[C.KEY_STATE_KEYS]).split("\n")
    arrays = parameters_to_ndarrays(fitins.parameters)
    state = {k: torch.from_numpy(a.copy()).to(torch.float32) for k, a in zip(keys, arrays, strict=True)}
    update = train_site(config, state, context)
    deltas = [(update.state[k].detach().to(torch.float32) - state[k]).numpy() for k in keys]
    metrics: dict[str, Any] = {k: v for k, v in update.metrics.items()
                               if isinstance(v, (int, float, str))}
    metrics[KEY_CLIENT_ID] = update.client_id
    metrics[C.KEY_CLIPPED] = _clipped(deltas, update.num_examples, config)
    if metrics[C.KEY_CLIPPED]:
        log.warning("site %s: %d values exceed the SecAgg+ clipping range and were clipped; "
                    "the coordinator should raise secure_aggregation.clipping_range",
                    update.client_id, metrics[C.KEY_CLIPPED])
    fitres = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(deltas),
                    num_examples=update.num_examples, metrics=metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _clipped(deltas: list[np.ndarray], num_examples: int, config: Mapping[str, Any]) -> int:
    """How many values of ``weight * delta`` fall outside the SecAgg+ clipping range."""
    weight = num_examples / float(config[C.KEY_MAX_WEIGHT])
    clip = float(config[C.KEY_CLIP])
    return int(sum(int((np.abs(d * weight) > clip).sum()) for d in deltas))
