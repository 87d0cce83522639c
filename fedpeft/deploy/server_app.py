"""The Flower ``ServerApp``: reads the run folder, serves every round, reports its status.

``fedpeft server`` creates the run folder (``config.yaml``, ``deploy.yaml``) and starts this
app with ``flwr run``; the app gets only the folder's path (run config ``run-dir``). Its log
goes to ``flower/logs/serverapp.log`` (the coordinator prints it) and to stderr (``flwr log``);
``flower/status.json`` says whether it completed or why it failed.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpeft.config import load_config
from fedpeft.constants import CONFIG_FILE
from fedpeft.deploy import constants as C
from fedpeft.deploy.launch import write_status
from fedpeft.deploy.settings import load_deploy_config
from fedpeft.deploy.transport import FlowerTransport
from fedpeft.errors import FedPeftError
from fedpeft.run_dir import RunDir

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Serve the job of the run folder named in the run config."""
    run_dir = Path(str(context.run_config[C.RUN_DIR]))
    flower = run_dir / C.FLOWER_DIR
    _log_to(flower / C.LOGS_DIR / C.SERVERAPP_LOG)
    write_status(flower, context.run_id, C.STATUS_RUNNING)
    try:
        cfg = load_config(run_dir / CONFIG_FILE)
        dep = load_deploy_config(run_dir / C.DEPLOY_CONFIG_FILE, cfg)
        registered = flower / C.SITE_NODES_FILE if dep.authenticate else None
        transport = FlowerTransport(grid, context, dep, registered)
        # Ask the sites who they are while torch, transformers and the model load.
        threading.Thread(target=transport.connected, daemon=True).start()
        from fedpeft.deploy.flower_pool import serve

        allow = tuple(k for k in str(context.run_config.get(C.ALLOW_CONFIG_CHANGE, "")).split(",") if k)
        serve(cfg, dep, RunDir(run_dir), transport, allow)
    except (SystemExit, KeyboardInterrupt):  # Flower's SIGTERM handler: the SuperLink stops
        log.warning("the server was stopped; the last completed round is checkpointed")
        write_status(flower, context.run_id, C.STATUS_FAILED, "stopped")
        raise
    except FedPeftError as e:  # a known failure (a round below min_clients...): its message says it all
        log.error("the server stopped: %s", e)
        write_status(flower, context.run_id, C.STATUS_FAILED, f"{type(e).__name__}: {e}")
        raise
    except BaseException as e:
        log.exception("the server stopped")
        write_status(flower, context.run_id, C.STATUS_FAILED, f"{type(e).__name__}: {e}")
        raise
    write_status(flower, context.run_id, C.STATUS_COMPLETED)
    log.info("done: %s", run_dir)


def _log_to(path: Path) -> None:
    """fedpeft's INFO logs to ``path`` and stderr (``flwr-serverapp`` forwards only stdio)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pkg = logging.getLogger("fedpeft")
    pkg.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    for handler in (logging.FileHandler(path, encoding="utf-8"), logging.StreamHandler()):
        handler.setFormatter(fmt)
        pkg.addHandler(handler)
