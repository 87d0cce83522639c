"""The Flower ``ClientApp`` a site runs (``fedpeft client`` starts the SuperNode that runs it).

flwr 1.42 starts a fresh ``flwr-clientapp`` process for every message, so this module stays
light: answering "who are you" and SecAgg+'s key-exchange stages import neither torch nor
transformers. Training (:mod:`fedpeft.deploy.site`) imports them only when a training message
arrives.

Nothing about the site's data leaves it except the number of training examples and scalar
training metrics (loss, steps, seconds): a failure is reported to the server as its exception
type only, and logged in full on the site.
"""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedpeft.deploy import constants as C
from fedpeft.errors import FedPeftError

log = logging.getLogger(__name__)


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
        SiteFailure: naming only the exception type; the traceback is logged here.
    """
    try:
        from fedpeft.deploy import site  # torch, transformers, peft: only when training

        return site.handle_train(msg, context)
    except Exception as e:  # noqa: BLE001 - reported without details, so no data or path leaks
        log.exception("site %r: training failed", site_name(context))
        raise SiteFailure(f"site {site_name(context)!r} failed with {type(e).__name__}; "
                          "the details are in that site's log") from None
