"""``fedpeft client``: run one site's SuperNode and trainer until it is stopped.

The site's data path stays on the machine (this process and the SuperNode's node config, a
TOML file in the site's workspace). The command checks the file first, starts the site's
trainer (:mod:`fedpeft.deploy.trainer_service`: the model stays loaded between rounds) and
``flower-supernode`` (TLS with the coordinator's CA, the site's private key when the server
authenticates sites), echoes the SuperNode's log, and restarts it (bounded) if it exits, e.g.
when the coordinator restarts its server. A refused key ends it with a clear message instead.
The site runs only the code its operator allowed here (``--allow-remote-code``,
``--allow-plugin FILE``: :mod:`fedpeft.deploy.site_policy`), whatever job the server sends.
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedpeft.data.io import load_examples, read_objects
from fedpeft.deploy import constants as C
from fedpeft.deploy.launch import flower_env, free_port, spawn, stop_group, supernode_argv
from fedpeft.deploy.settings import SITE_NAME_PATTERN
from fedpeft.deploy.site_policy import SitePolicy
from fedpeft.deploy.trainer_service import MAX_SOCKET_PATH, TrainerServer, write_authkey
from fedpeft.errors import ConfigError, DataError

log = logging.getLogger(__name__)

EXIT_REFUSED = 3
SUPERNODE_PID_FILE = "supernode.pid"
TRAINER_SOCKET_FILE = "trainer.sock"
NOISE_KEY_FILE = "dp-noise.key"
TRAINER_KEY_FILE = "trainer.key"  # the socket's key, new for every fedpeft client process (0600)
_REFUSALS_TOLERATED = 2  # a site may start before the coordinator has registered its key
_RESTART_DELAY_S = 10.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CONTACT_MARKERS = ("Receiving:", "Sent reply")  # the SuperNode reached the server
_REFUSAL_MARKERS = ("Failed to activate SuperNode", "No SuperNode found with the given public key")


@dataclass
class SiteOptions:
    """What ``fedpeft client`` was given."""

    server: str  # HOST:PORT of the coordinator's SuperLink
    data: Path  # this site's JSONL file (stays here)
    name: str  # this site's name, as listed in the coordinator's deploy.yaml
    workspace: Path  # FLWR_HOME and node config of this site
    ca_cert: Path | None = None  # the coordinator's CA (None: --insecure)
    private_key: Path | None = None  # this site's key (server authenticates sites)
    device: str = ""  # "" = the job's model.devices
    retry_for_s: float = 3600.0  # give up after the server was unreachable this long
    restarts: int = 20  # restart the SuperNode at most this often
    allow_remote_code: bool = False  # run jobs with model.trust_remote_code
    allow_plugins: tuple[Path, ...] = ()  # plugin files (file.py[:Obj]) a job may name
    max_epsilon: float | None = None  # refuse jobs that would spend more epsilon of this site's data
    require_secure_aggregation: bool = False  # refuse rounds without SecAgg+

    def __post_init__(self) -> None:
        # The SuperNode runs in the workspace: relative paths are taken from this directory now.
        absolute = _absolute
        self.data, self.workspace = absolute(self.data), absolute(self.workspace)
        self.ca_cert = None if self.ca_cert is None else absolute(self.ca_cert)
        self.private_key = None if self.private_key is None else absolute(self.private_key)
        self.allow_plugins = tuple(absolute(p) for p in self.allow_plugins)

    def policy(self) -> SitePolicy:
        """The code this site allows (raises ConfigError for a missing plugin file)."""
        return SitePolicy.from_flags(self.allow_remote_code, self.allow_plugins, self.max_epsilon,
                                     self.require_secure_aggregation)


def _absolute(path: str | Path) -> Path:
    return Path(path).expanduser().absolute()


def check_site(opts: SiteOptions) -> int:
    """Check the options and the data file before starting; return the file's row count.

    Raises:
        ConfigError: for a bad name, server address, missing certificate/key or plugin file.
        DataError: if the data file is missing or unreadable.
    """
    opts.policy()
    if not re.match(SITE_NAME_PATTERN, opts.name):
        raise ConfigError(f"--name {opts.name!r}: use letters, digits, '.', '_' or '-' (as in deploy.yaml)")
    if ":" not in opts.server:
        raise ConfigError(f"--server {opts.server!r}: expected HOST:PORT, e.g. hub.example.org:9092")
    for flag, path in (("--root-certificates", opts.ca_cert), ("--auth-key", opts.private_key)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{flag}: file not found: {path}")
    if not opts.data.is_file():
        raise DataError(f"--data: file not found: {opts.data}")
    if sum(1 for _ in read_objects(opts.data)) == 0:  # every line: JSON, UTF-8, an object; whatever the fields
        raise DataError(f"--data {opts.data}: no rows (empty, or only blank lines); expected one JSON object "
                        "per line with a question and an answer")
    try:
        return len(load_examples(opts.data))
    except DataError as e:  # the job may name other fields: only the server's config knows
        log.warning("could not read %s with the default field names (%s); the job's "
                    "data.question_field/answer_field apply when training", opts.data, e)
        return -1


def trainer_socket_path(workspace: Path) -> Path:
    """The trainer's socket: in the workspace, or in a private temporary folder if that path is too long.

    A Unix socket path holds at most about 100 bytes; the socket's key stays in the workspace, so
    only a process that can read the workspace may still ask for training.
    """
    path = workspace / TRAINER_SOCKET_FILE
    if len(str(path)) <= MAX_SOCKET_PATH:
        return path
    short = Path(tempfile.mkdtemp(prefix="fedpeft-site-")) / TRAINER_SOCKET_FILE  # mode 0700
    log.info("the workspace path is too long for a Unix socket; the trainer listens on %s", short)
    return short


def noise_key(workspace: Path) -> bytes:
    """This site's secret for its DP noise (``dp-noise.key``, mode 0600), made once and kept.

    Kept across restarts, so a replayed round draws the same noise (a resumed deployment stays
    exact); never sent anywhere.
    """
    path = workspace / NOISE_KEY_FILE
    if not path.is_file():
        workspace.mkdir(parents=True, exist_ok=True)
        write_authkey(path)
    return path.read_bytes()


def write_node_config(opts: SiteOptions, trainer_socket: Path, trainer_key: Path) -> Path:
    """The SuperNode's node config as a TOML file (any path survives quoting)."""
    values = {C.NODE_SITE_NAME: opts.name, C.NODE_DATA_PATH: str(opts.data.resolve()),
              C.NODE_DEVICE: opts.device, C.NODE_TRAINER_SOCKET: str(trainer_socket),
              C.NODE_TRAINER_KEY: str(trainer_key)}
    path = opts.workspace / "node-config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(values), encoding="utf-8")
    return path


class _LazyTrainer:
    """The site's :class:`~fedpeft.deploy.site_training.SiteTrainer`, imported (torch...) in the background."""

    def __init__(self, opts: SiteOptions) -> None:
        self.opts, self._trainer, self._lock = opts, None, threading.Lock()
        threading.Thread(target=self.get, daemon=True).start()

    def get(self) -> Any:
        with self._lock:
            if self._trainer is None:
                from fedpeft.deploy.site_training import SiteTrainer

                self._trainer = SiteTrainer(self.opts.name, self.opts.data, self.opts.device,
                                            policy=self.opts.policy(), noise_key=noise_key(self.opts.workspace))
            return self._trainer

    def __call__(self, config: dict, state: dict) -> tuple:
        return self.get().train(config, state)


def run_site(opts: SiteOptions, echo: Callable[[str], Any] = sys.stderr.write) -> int:
    """Run the trainer and the SuperNode until interrupted; restart the SuperNode if it exits.

    Args:
        opts: What ``fedpeft client`` was given.
        echo: Where the SuperNode's output goes, line by line.

    Returns:
        0 when stopped, :data:`EXIT_REFUSED` if the server refused this site's key, else the
        SuperNode's last exit code.
    """
    rows = check_site(opts)
    if opts.ca_cert is None:
        log.warning("INSECURE: --insecure sends this site's updates in clear text; use it only on "
                    "a loopback test")
    opts.workspace.mkdir(parents=True, exist_ok=True)
    socket_path, key_path = trainer_socket_path(opts.workspace), opts.workspace / TRAINER_KEY_FILE
    node_config = write_node_config(opts, socket_path, key_path)
    log.info("site %s: %s (%s rows) -> %s", opts.name, opts.data, rows if rows >= 0 else "?", opts.server)
    _log_policy(opts.policy())
    try:
        with TrainerServer(socket_path, key_path, _LazyTrainer(opts)):
            return _supervise(opts, node_config, echo)
    finally:
        if socket_path.parent != opts.workspace:
            shutil.rmtree(socket_path.parent, ignore_errors=True)


def _log_policy(policy: SitePolicy) -> None:
    if policy.allow_remote_code:
        log.warning("--allow-remote-code: a job with model.trust_remote_code runs its model's code here")
    for path in sorted(policy.plugins):
        log.info("--allow-plugin: a job may run %s", path)
    if policy.max_epsilon is not None:
        log.info("--max-epsilon %g: jobs that would spend more of this site's privacy budget are refused",
                 policy.max_epsilon)
    if policy.require_secure_aggregation:
        log.info("--require-secure-aggregation: rounds without SecAgg+ are refused")


def _supervise(opts: SiteOptions, node_config: Path, echo: Callable[[str], Any]) -> int:
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code, refusals, contact = 0, 0, [time.monotonic()]
        for restarts in range(opts.restarts + 1):
            code, refused = _run_once(opts, node_config, stop, echo, contact)
            refusals += refused
            if refused:
                log.error("the server refused site %s: its public key is not registered. Send %s.pub "
                          "to the coordinator, who adds it to sites in deploy.yaml (refusal %d of %d)",
                          opts.name, opts.private_key or "this site's key", refusals,
                          _REFUSALS_TOLERATED + 1)
            if refusals > _REFUSALS_TOLERATED:
                return EXIT_REFUSED
            if stop.is_set():
                return 0
            silent_s = time.monotonic() - contact[0]
            if not refused and silent_s >= opts.retry_for_s:
                log.error("site %s: no contact with the server at %s for %.0f s (--retry-for %.0f); giving up. "
                          "Is `fedpeft server` running there, and are the address and --insecure / "
                          "--root-certificates the server's?", opts.name, opts.server, silent_s, opts.retry_for_s)
                return code or 1
            why = "retrying: the coordinator may still be registering keys" if refused \
                else f"the SuperNode exited with code {code}"
            if restarts == opts.restarts:
                log.error("%s; giving up after %d restarts", why, opts.restarts)
                break
            log.warning("%s; restarting in %.0f s (restart %d of %d)", why, _RESTART_DELAY_S,
                        restarts + 1, opts.restarts)
            if stop.wait(_RESTART_DELAY_S):
                return 0
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_once(opts: SiteOptions, node_config: Path, stop: threading.Event,
              echo: Callable[[str], Any], contact: list[float]) -> tuple[int, bool]:
    """One SuperNode process: echo its output; return ``(exit code, refused)``.

    ``contact[0]`` is the last time the SuperNode showed it reached the server; the SuperNode
    retries an unreachable server only for what is left of ``--retry-for`` since then.
    """
    left_s = max(1.0, opts.retry_for_s - (time.monotonic() - contact[0]))
    argv = supernode_argv(opts.server, node_config, ca_cert=opts.ca_cert, private_key=opts.private_key,
                          runtime_port=free_port(), retry_for_s=left_s)
    proc = spawn(argv, flower_env(opts.workspace / "flwr-home"), None, opts.workspace)
    (opts.workspace / SUPERNODE_PID_FILE).write_text(f"{proc.pid}\n")  # its own process group
    refused = threading.Event()
    reader = threading.Thread(target=_echo, args=(proc, refused, echo, contact), daemon=True)
    reader.start()
    while proc.poll() is None and not stop.is_set():
        time.sleep(0.5)
    stop_group(proc)
    reader.join(timeout=5.0)
    return proc.returncode, refused.is_set()


def _echo(proc: subprocess.Popen, refused: threading.Event, echo: Callable[[str], Any],
          contact: list[float]) -> None:
    for raw in proc.stdout:
        line = _ANSI.sub("", raw.decode("utf-8", errors="replace")).rstrip()
        if any(marker in line for marker in _CONTACT_MARKERS):
            contact[0] = time.monotonic()
        if any(marker in line for marker in _REFUSAL_MARKERS):
            refused.set()
        if line.strip():
            echo(line + "\n")
