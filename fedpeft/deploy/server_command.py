"""``fedpeft server``: start the SuperLink, register the sites' keys, run the job, follow it.

One command for the coordinator. It creates (or, with ``--resume``, reuses) the run folder,
starts ``flower-superlink`` (TLS, site authentication), registers every site's public key,
starts fedpeft's ServerApp with ``flwr run``, prints the ServerApp's log while the rounds run,
reports sites that were refused, and stops the SuperLink when the run ends (bounded by
:meth:`DeployConfig.run_timeout_s`).
"""

from __future__ import annotations

import json
import logging
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fedpeft.config import JobConfig, load_config
from fedpeft.constants import CONFIG_FILE
from fedpeft.deploy import constants as C
from fedpeft.deploy.launch import DeployError, SuperLink, read_status
from fedpeft.deploy.settings import DeployConfig, dump_deploy_config, load_deploy_config
from fedpeft.deploy.tls import fingerprint
from fedpeft.errors import ConfigError, RoundError
from fedpeft.io_utils import write_json, write_text
from fedpeft.privacy.ledger import resolve_noise
from fedpeft.run_dir import RunDir

log = logging.getLogger(__name__)
serverapp_log = logging.getLogger("fedpeft.serverapp")

_FLWR_LS_EVERY_S = 15.0  # each `flwr` call costs 1-3 s of CPU: ask Flower rarely
_WATCH_POLL_S = 1.0
_DATA_PATH_KEYS = ("data.train", "data.test")
_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) (.*)$")
_REFUSED = re.compile(r"public key: b'(-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----\\n)'")


def prepare_run(job: str | Path | None, deploy: str | Path | None, overrides: list[str],
                resume: str | Path | None) -> tuple[JobConfig, DeployConfig, RunDir]:
    """Load and check both configs; create the run folder (or reuse it with ``resume``).

    Relative paths (the files, a ``data.train``/``data.test`` override) are taken from the
    working directory here: the ServerApp Flower starts runs elsewhere and gets them absolute.

    Raises:
        ConfigError: listing every problem of either file.
    """
    job, deploy, resume = (Path(p).expanduser().absolute() if p else None for p in (job, deploy, resume))
    if resume:
        run = RunDir.open(resume)
        cfg = load_config(run.path / CONFIG_FILE)
        deploy = deploy or run.path / C.DEPLOY_CONFIG_FILE
    else:
        if not job or not deploy:
            raise ConfigError("fedpeft server: give JOB.yaml and --deploy DEPLOY.yaml, or --resume RUN_DIR")
        cfg = load_config(job, [_absolute_data_override(o) for o in overrides])
    dep = load_deploy_config(deploy, cfg)
    if not resume:
        cfg = resolve_noise(cfg)  # the sites get the calibrated noise with the job
        run = RunDir.create(cfg)
    write_text(run.path / C.DEPLOY_CONFIG_FILE, dump_deploy_config(dep))
    return cfg, dep, run


def _absolute_data_override(item: str) -> str:
    """``data.test=x.jsonl`` typed on the command line names ``x.jsonl`` of the working directory."""
    key, sep, value = item.partition("=")
    value = value.strip()
    if key.strip() not in _DATA_PATH_KEYS or not value or value.startswith(("builtin:", "hf:")):
        return item
    return f"{key}{sep}{Path(value).expanduser().absolute()}"


def serve_job(cfg: JobConfig, dep: DeployConfig, run: RunDir, allow_config_change: tuple[str, ...] = ()) -> str:
    """Run the deployment of ``run`` to its end; return Flower's final run status.

    Raises:
        DeployError: if a Flower process fails or the run does not end in time.
        RoundError: if the ServerApp stopped (e.g. a round stayed below min_clients).
    """
    if dep.insecure:
        log.warning("INSECURE: TLS is off; updates and site names travel in clear text. Use "
                    "this only on a loopback test (tls: in deploy.yaml for anything else)")
    flower = run.path / C.FLOWER_DIR
    link = SuperLink(flower, dep.host_port, None if dep.insecure else dep.tls, dep.authenticate)
    previous = {sig: signal.signal(sig, _stop_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        link.start()
        (flower / C.SITE_NODES_FILE).unlink(missing_ok=True)
        tails = (_Tail(flower / C.LOGS_DIR / C.SERVERAPP_LOG), _Tail(link.log_path))
        run_id = link.run({C.RUN_DIR: str(run.path.resolve()),  # its ServerApp loads meanwhile
                           C.ALLOW_CONFIG_CHANGE: ",".join(allow_config_change)})
        log.info("Flower run %d started", run_id)
        if dep.authenticate:
            _register_sites(link, dep, flower / C.SITE_NODES_FILE)
        log.info("ready: sites connect to %s:%d", *dep.host_port)
        return _follow(link, run_id, flower, tails, dep.run_timeout_s(cfg.federation.rounds),
                       _registered_fingerprints(dep))
    finally:
        link.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _register_sites(link: SuperLink, dep: DeployConfig, nodes_file: Path) -> None:
    """Register every site's public key; the ServerApp reads ``nodes_file`` (name -> node id)."""
    with ThreadPoolExecutor(max_workers=4) as pool:  # each `flwr` call takes seconds
        ids = list(pool.map(lambda s: link.register_site(s.public_key, s.name), dep.sites))
    write_json(nodes_file, dict(zip(dep.site_names, ids)))
    log.info("registered %d site keys: %s", len(ids), ", ".join(dep.site_names))


def _stop_on_signal(signum: int, frame: object) -> None:
    """SIGTERM/SIGHUP: unwind, so the SuperLink (and the ServerApp) are stopped too."""
    raise DeployError(f"stopped by signal {signal.Signals(signum).name}; the last completed round "
                      "is checkpointed: resume with fedpeft server --resume RUN_DIR")


def _registered_fingerprints(dep: DeployConfig) -> frozenset[str]:
    """The fingerprints of the sites' keys in ``deploy.yaml`` (never reported as refused)."""
    return frozenset(fingerprint(s.public_key.read_bytes()) for s in dep.sites if s.public_key is not None)


def _follow(link: SuperLink, run_id: int, flower: Path, tails: tuple[_Tail, _Tail],
            timeout_s: float, registered: frozenset[str] = frozenset()) -> str:
    """Print the ServerApp's log and refused sites until the run ends (at most ``timeout_s``)."""
    app_log, link_log = tails
    deadline, next_ls, status = time.monotonic() + timeout_s, time.monotonic() + _FLWR_LS_EVERY_S, ""
    while time.monotonic() < deadline:
        _echo_serverapp(app_log.new_lines())
        for line in link_log.new_lines():
            _report_refusal(line, registered)
        status = read_status(flower, run_id).get("status", "")
        if status in (C.STATUS_COMPLETED, C.STATUS_FAILED):
            break
        if link.proc.poll() is not None:
            raise DeployError(f"the SuperLink exited with code {link.proc.returncode}; see {link.log_path}")
        if time.monotonic() >= next_ls:  # a ServerApp that died before writing its status
            flower_status = link.run_status(run_id)
            if flower_status.startswith("finished"):
                status = status or flower_status
                break
            next_ls = time.monotonic() + _FLWR_LS_EVERY_S
        time.sleep(_WATCH_POLL_S)
    else:
        raise DeployError(f"run {run_id} did not finish within {timeout_s:.0f}s; stopping it")
    _echo_serverapp(app_log.new_lines())
    info = read_status(flower, run_id)
    if info.get("status") != C.STATUS_COMPLETED:
        raise RoundError(f"the server stopped: {info.get('error') or status} (log: "
                         f"{flower / C.LOGS_DIR / C.SERVERAPP_LOG})")
    return status


def _echo_serverapp(lines: list[str]) -> None:
    """Re-log the ServerApp's lines (``HH:MM:SS LEVEL message``) at their level."""
    for line in lines:
        match = _LOG_LINE.match(line)
        level, text = (logging.getLevelName(match.group(1)), match.group(2)) if match else (logging.INFO, line)
        serverapp_log.log(level if isinstance(level, int) else logging.INFO, "%s", text)


def _report_refusal(line: str, registered: frozenset[str] = frozenset()) -> None:
    """Turn the SuperLink's "no SuperNode with this key" error into one clear line.

    A site in ``deploy.yaml`` that connects before its key is registered gets the same error
    (its SuperNode retries and joins): keys whose fingerprint is in ``registered`` are not
    reported.
    """
    if "No SuperNode found with the given public key" not in line:
        return
    match = _REFUSED.search(line)
    key = "unknown key"
    if match:
        try:
            key = fingerprint(match.group(1).replace("\\n", "\n").encode())
        except ValueError:
            key = "unparsable key"
    if key in registered:
        log.debug("site key %s connected before its registration finished; it will retry", key)
        return
    log.warning("refused a site whose public key is not registered (%s); to admit it, add its "
                ".pub file to sites in deploy.yaml", key)


class _Tail:
    """Complete lines appended to a text file after this object was made."""

    def __init__(self, path: Path) -> None:
        self.path, self.rest = path, ""
        self.offset = path.stat().st_size if path.is_file() else 0  # a resumed run's old lines

    def new_lines(self) -> list[str]:
        if not self.path.is_file():
            return []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            f.seek(self.offset)
            text = f.read()
            self.offset = f.tell()
        *lines, self.rest = (self.rest + text).split("\n")
        return [line for line in lines if line.strip()]


def summary_line(run: RunDir) -> str:
    """One line on what the run wrote."""
    summary = json.loads((run.path / "summary.json").read_text())
    return (f"run folder: {run.path} (adapter/, metrics.jsonl, checkpoints/); "
            f"final: {summary.get('final') or 'no test set'}")
