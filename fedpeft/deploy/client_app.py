"""The Flower ``ClientApp`` a site runs (``fedpeft client`` starts the SuperNode that runs it).

flwr 1.42 starts a fresh ``flwr-clientapp`` process for every message, so this module stays
light (Flower, NumPy, safetensors; no torch): it unpacks the message and hands training to the
site's long-lived trainer (:mod:`fedpeft.deploy.trainer_service`) over a Unix socket, or, when the
SuperNode was started without one, trains in this process (:mod:`fedpeft.deploy.site_training`).

Nothing about the site's data leaves it except the number of training examples and scalar
training metrics (loss, steps, seconds): a failure is reported to the server as its exception
type only, and logged in full on the site. The one exception is a refused job
(:class:`~fedpeft.deploy.site_policy.SiteRefusal`: it asks for code the site did not allow),
whose message names only what the server asked for and the flag that would allow it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedpeft.constants import KEY_CLIENT_ID, KEY_NUM_EXAMPLES
from fedpeft.deploy import constants as C
from fedpeft.deploy.site_policy import SiteRefusal
from fedpeft.errors import FedPeftError

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
_LEGACY_PARAMETERS = "fitins.parameters"  # FitIns layout: what SecAgg+'s workflow sends
_DEFAULT_TIMEOUT_S = 24 * 3600.0


class SiteFailure(FedPeftError):
    """Training failed on a site; the details stay in the site's own log."""


def optional_secaggplus_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """``secaggplus_mod`` for SecAgg+ messages only (it raises ``KeyError`` on plain ones)."""
    if msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


app = ClientApp(mods=[optional_secaggplus_mod])


def site_name(context: Context) -> str:
    """This site's name, from its node config (``fedpeft client --name``)."""
    return str(context.node_config.get(C.NODE_SITE_NAME, ""))


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer the server's "which site are you" (the only thing it asks)."""
    return Message(RecordDict({C.RECORD_CONFIG: ConfigRecord({C.KEY_SITE: site_name(context)})}),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this site's data from the global state in ``msg``; reply with the update.

    Raises:
        SiteFailure: naming only the exception type; the traceback is logged on the site.
    """
    try:
        if _LEGACY_PARAMETERS in msg.content.array_records:
            return _train_legacy(msg, context)
        return _train_plain(msg, context)
    except SiteFailure:
        raise
    except SiteRefusal as e:  # in-process training (no trainer): the message may leave the site
        log.error("%s", e)
        raise SiteFailure(str(e)) from None
    except Exception as e:  # noqa: BLE001 - reported without details, so no data or path leaks
        log.exception("site %r: training failed", site_name(context))
        raise _failure(context, type(e).__name__) from None


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global adapter in ``msg`` on this site's own held-out slice; reply with numbers only.

    Raises:
        SiteFailure: naming only the exception type; the traceback is logged on the site.
    """
    try:
        config = dict(msg.content.config_records[C.RECORD_CONFIG])
        config[C.KEY_TASK] = C.TASK_EVALUATE
        state = {k: a.numpy() for k, a in msg.content.array_records[C.RECORD_STATE].items()}
        n, metrics, _ = _train(context, config, state)
    except SiteFailure:
        raise
    except Exception as e:  # noqa: BLE001 - reported without details, so no data or path leaks
        log.exception("site %r: scoring failed", site_name(context))
        raise _failure(context, type(e).__name__) from None
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return Message(RecordDict({C.RECORD_METRICS: MetricRecord({**numeric, KEY_NUM_EXAMPLES: n})}), reply_to=msg)


def _failure(context: Context, error: str) -> SiteFailure:
    return SiteFailure(f"site {site_name(context)!r} failed with {error}; the details are in that "
                       "site's log")


def _train(context: Context, config: dict[str, Any], state: Arrays) -> tuple[int, dict, Arrays]:
    """Train via the site's trainer process (or in this process); ``(n, metrics, new_state)``."""
    socket_path = str(context.node_config.get(C.NODE_TRAINER_SOCKET, ""))
    if socket_path:
        from fedpeft.deploy.trainer_service import ERROR, REASON, request_training

        timeout = float(config.get(C.KEY_TIMEOUT, _DEFAULT_TIMEOUT_S))
        key_path = str(context.node_config[C.NODE_TRAINER_KEY])
        header, new_state = request_training(socket_path, key_path, config, state, timeout)
        if REASON in header:  # a refused job: the trainer's message is meant for the server
            raise SiteFailure(str(header[REASON]))
        if ERROR in header:
            raise _failure(context, str(header[ERROR]))
        n, metrics = int(header["num_examples"]), dict(header["metrics"])
    else:
        from fedpeft.deploy.site_training import SiteTrainer  # torch etc.: only without a trainer process

        # A SuperNode started by hand (not by fedpeft client) allows no remote code or plugins.
        trainer = SiteTrainer(site_name(context), str(context.node_config[C.NODE_DATA_PATH]),
                              str(context.node_config.get(C.NODE_DEVICE, "")))
        n, metrics, _, new_state = trainer.train(config, state)
    # Send what was trained, as it is (fp32, or the job's codec's arrays: their own dtypes); the
    # server checks every update's keys, shapes and values.
    return n, metrics, {k: np.asarray(v) for k, v in new_state.items()}


def _train_plain(msg: Message, context: Context) -> Message:
    config = dict(msg.content.config_records[C.RECORD_CONFIG])
    config[C.KEY_SECURE] = False  # whatever the server wrote: this is the plain path
    state = {k: a.numpy() for k, a in msg.content.array_records[C.RECORD_STATE].items()}
    n, metrics, new_state = _train(context, config, state)
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    text = {k: str(v) for k, v in metrics.items() if k not in numeric}
    return Message(RecordDict({
        C.RECORD_STATE: ArrayRecord({k: Array(v) for k, v in new_state.items()}),
        C.RECORD_METRICS: MetricRecord({**numeric, KEY_NUM_EXAMPLES: n}),
        C.RECORD_CONFIG: ConfigRecord({**text, KEY_CLIENT_ID: site_name(context)}),
    }), reply_to=msg)


def _train_legacy(msg: Message, context: Context) -> Message:
    """Answer SecAgg+'s "collect masked vectors" stage (FitIns in, FitRes out).

    The site sends its *delta* ``x_i - global``, not its state: deltas are small, so a tight
    clipping range keeps the quantisation step ``2 * clip / Q`` small; the server adds the
    global state back. ``secaggplus_mod`` then masks and quantises the reply's parameters.
    """
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    keys = str(config[C.KEY_STATE_KEYS]).split("\n")
    state = dict(zip(keys, parameters_to_ndarrays(fitins.parameters), strict=True))
    config[C.KEY_SECURE] = True  # set here, by the site's own code: it sees the SecAgg+ protocol run
    n, metrics, new_state = _train(context, config, state)
    deltas = [(new_state[k] - state[k].astype(np.float32)) for k in keys]
    bad = [k for k, d in zip(keys, deltas) if not np.isfinite(d).all()]
    if bad:  # masked and quantised, NaN would become finite garbage in the sum nobody can screen
        raise SiteFailure(f"site {site_name(context)!r}: non-finite values (NaN or Inf) in {len(bad)} tensor(s) of "
                          f"its update, e.g. {bad[0]!r}; not sent (under SecAgg+ the server cannot check updates)")
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
    metrics[KEY_CLIENT_ID] = site_name(context)
    metrics[C.KEY_CLIPPED] = _clipped(deltas, n, config)
    if metrics[C.KEY_CLIPPED]:
        log.warning("site %s: %d values exceed the SecAgg+ clipping range and were clipped; the "
                    "coordinator should raise secure_aggregation.clipping_range",
                    site_name(context), metrics[C.KEY_CLIPPED])
    fitres = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(deltas),
                    num_examples=n, metrics=metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _clipped(deltas: list[np.ndarray], num_examples: int, config: dict[str, Any]) -> int:
    """How many values of ``weight * delta`` fall outside the SecAgg+ clipping range."""
    weight = num_examples / float(config[C.KEY_MAX_WEIGHT])
    clip = float(config[C.KEY_CLIP])
    return int(sum(int((np.abs(d * weight) > clip).sum()) for d in deltas))
