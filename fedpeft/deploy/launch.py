"""Flower processes: the SuperLink and the ``flwr`` CLI (coordinator), a SuperNode (site).

Every Flower process gets its own ``FLWR_HOME`` inside the run's (or the site's) workspace,
telemetry and the update check off, and no runtime dependency installation
(docs/deploy-notes.md, section 2). Each process starts in its own session, so stopping it
signals its whole group (the SuperExec and app processes it spawned) and nothing else. Every
wait is bounded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import tomli_w

from fedpeft.deploy import constants as C
from fedpeft.deploy.settings import TlsConfig
from fedpeft.errors import FedPeftError
from fedpeft.io_utils import write_json

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr live here
CONNECTION = "fedpeft"  # SuperLink connection name in the CLI's config.toml
APP_NAME = "fedpeft-deploy"
_PROBE_INTERVAL_S = 0.5
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class DeployError(FedPeftError):
    """A Flower process failed to start or exited early, or a run did not finish in time."""


def flower_env(home: Path) -> dict[str, str]:
    """Environment of a Flower process: private ``FLWR_HOME``, no telemetry, fedpeft importable."""
    env = dict(os.environ)
    env.update(C.FLOWER_ENV)
    env["FLWR_HOME"] = str(home)
    # The generated app holds only pyproject.toml: its components import fedpeft from here.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # SuperLink/SuperNode start `flower-superexec` by bare name: it must be on PATH.
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child (Linux): get SIGTERM when the process that started it dies, even by SIGKILL."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(argv: list[str], env: dict[str, str], log_path: Path | None, cwd: Path) -> subprocess.Popen:
    """Start ``argv`` in a new session; output to ``log_path`` (or piped when ``None``).

    The child gets its own process group (so :func:`stop_group` reaches the processes it
    starts, and nothing else) and, on Linux, dies with the process that started it, so a
    coordinator or site killed outright leaves no SuperLink or SuperNode behind.
    """
    out = open(log_path, "ab") if log_path else subprocess.PIPE  # noqa: SIM115 - child keeps it
    try:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    finally:
        if log_path:
            out.close()


def stop_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM ``proc``'s process group, SIGKILL it after ``grace_s``; wait for ``proc``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)  # the group start_new_session created: only our processes
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue


def write_status(flower_dir: Path, run_id: int, status: str, error: str | None = None) -> None:
    """``flower/status.json``: what the ServerApp of Flower run ``run_id`` is doing."""
    write_json(flower_dir / C.STATUS_FILE, {"run_id": run_id, "status": status, "error": error})


def read_status(flower_dir: Path, run_id: int) -> dict[str, Any]:
    """The last status of run ``run_id``'s ServerApp (``{}`` before it wrote one).

    A ServerApp of an earlier run of the same folder (being stopped) is ignored.
    """
    path = flower_dir / C.STATUS_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if info.get("run_id") == run_id else {}


def app_pyproject(run_config: dict[str, Any]) -> str:
    """The Flower app's ``pyproject.toml``: fedpeft's ServerApp and ClientApp plus the run config."""
    components = {"serverapp": "fedpeft.deploy.server_app:app", "clientapp": "fedpeft.deploy.client_app:app"}
    return tomli_w.dumps({
        "project": {"name": APP_NAME, "version": "0.1.0", "description": "fedpeft on the Flower deployment runtime",
                    "license": "Apache-2.0", "dependencies": ["flwr>=1.42.0"]},
        "tool": {"flwr": {"app": {"publisher": "fedpeft", "components": components, "config": run_config}}},
    })


def cli_config(address: str, ca_cert: Path | None) -> str:
    """The ``flwr`` CLI's ``config.toml``: one SuperLink connection, TLS unless ``ca_cert`` is ``None``."""
    conn: dict[str, Any] = {"address": address}
    conn.update({"insecure": True} if ca_cert is None else {"root-certificates": str(Path(ca_cert).resolve())})
    return tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}})


class SuperLink:
    """The coordinator's ``flower-superlink`` process and the ``flwr`` CLI that drives it.

    Args:
        flower_dir: ``<run>/flower``: FLWR_HOMEs, logs and the generated app go here.
        listen: ``(host, port)`` the SuperLink serves Fleet, Control and Runtime APIs on.
        tls: Certificates, or ``None`` for plain HTTP.
        authenticate: ``--enable-supernode-auth`` (sites must be registered; needs TLS).
        startup_timeout_s: Bound on the wait for ``/health``.
    """

    def __init__(self, flower_dir: Path, listen: tuple[str, int], tls: TlsConfig | None,
                 authenticate: bool, startup_timeout_s: float = 60.0) -> None:
        self.dir = flower_dir.resolve()
        self.host, self.port = listen
        self.tls, self.authenticate = tls, authenticate
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        (self.dir / C.LOGS_DIR).mkdir(parents=True, exist_ok=True)

    @property
    def local_address(self) -> str:
        """Where this machine reaches the SuperLink (loopback when it listens everywhere)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.dir / C.LOGS_DIR / C.SUPERLINK_LOG

    def start(self) -> None:
        """Start the SuperLink and wait (bounded) until ``/health`` answers.

        Raises:
            DeployError: if the port is taken (another server still running?) or the SuperLink
                exits or does not answer in time.
        """
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((self.host, self.port))
            except OSError as e:
                raise DeployError(f"cannot listen on {self.host}:{self.port} ({e.strerror}); is "
                                  "another fedpeft server (or Flower SuperLink) still running?") from e
        argv = [str(VENV_BIN / "flower-superlink"), "--host", self.host, "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        if self.tls is None:
            argv.append("--insecure")
        else:
            argv += ["--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile",
                     str(self.tls.server_cert), "--ssl-keyfile", str(self.tls.server_key)]
        if self.authenticate:
            argv.append("--enable-supernode-auth")
        self.proc = spawn(argv, flower_env(self.dir / "flwr-home" / "superlink"), self.log_path, self.dir)
        log.info("SuperLink started (pid %d) on %s:%d; log: %s", self.proc.pid, self.host, self.port,
                 self.log_path)
        self._wait_health()
        self._write_cli_config()

    def _wait_health(self) -> None:
        url = f"{'http' if self.tls is None else 'https'}://{self.local_address}/health"
        ctx = None if self.tls is None else ssl.create_default_context(cafile=str(self.tls.ca_cert))
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DeployError(f"the SuperLink exited with code {self.proc.returncode}; see "
                                  f"{self.log_path} (is port {self.port} already in use?)")
            try:
                with urllib.request.urlopen(url, timeout=2.0, context=ctx) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(_PROBE_INTERVAL_S)
        raise DeployError(f"the SuperLink did not answer {url} within {self.startup_timeout_s:.0f}s")

    def _write_cli_config(self) -> None:
        path = self.dir / "flwr-home" / "cli" / "config.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(cli_config(self.local_address, None if self.tls is None else self.tls.ca_cert),
                        encoding="utf-8")

    def flwr(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
        """One ``flwr`` CLI command against this SuperLink (bounded by ``timeout_s``)."""
        return subprocess.run([str(VENV_BIN / "flwr"), *args], capture_output=True, text=True,
                              env=flower_env(self.dir / "flwr-home" / "cli"), cwd=self.dir,
                              timeout=timeout_s)

    def register_site(self, public_key: Path, name: str) -> int:
        """Allow the site with ``public_key`` to join (``flwr supernode register``); its node id."""
        res = self.flwr("supernode", "register", str(public_key), CONNECTION, "--name", name,
                        "--format", "json")
        payload = _json_tail(res)
        if not payload.get("success"):
            raise DeployError(f"registering site {name!r} ({public_key}) failed: {res.stdout}{res.stderr}")
        return int(payload["node-id"])

    def run(self, run_config: dict[str, Any]) -> int:
        """``flwr run`` fedpeft's app with ``run_config``; return the Flower run id."""
        app_dir = self.dir / "app"
        app_dir.mkdir(parents=True, exist_ok=True)
        (app_dir / "pyproject.toml").write_text(app_pyproject(run_config), encoding="utf-8")
        res = self.flwr("run", str(app_dir), CONNECTION, "--format", "json")
        payload = _json_tail(res)
        if not payload.get("success"):
            raise DeployError(f"flwr run failed: {res.stdout}{res.stderr}")
        return int(payload["run-id"])

    def run_status(self, run_id: int) -> str:
        """Flower's status of a run (``running``, ``finished:completed``, ``finished:failed``...)."""
        res = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        runs = _json_tail(res).get("runs", [])
        return str(runs[0]["status"]) if runs else "unknown"

    def stop(self) -> None:
        """Stop the SuperLink (and the SuperExec / ServerApp it started)."""
        if self.proc is not None:
            stop_group(self.proc)


def supernode_argv(server: str, node_config: Path, *, ca_cert: Path | None, private_key: Path | None,
                   runtime_port: int, retry_for_s: float) -> list[str]:
    """``flower-supernode`` for one site (TLS unless ``ca_cert`` is ``None``)."""
    argv = [str(VENV_BIN / "flower-supernode"), "--superlink", server, "--node-config", str(node_config),
            "--port", str(runtime_port), "--max-wait-time", str(retry_for_s), "--max-retries", "1000"]
    argv += ["--insecure"] if ca_cert is None else ["--root-certificates", str(ca_cert)]
    if private_key is not None:
        argv += ["--auth-supernode-private-key", str(private_key)]
    return argv


def _json_tail(res: subprocess.CompletedProcess) -> dict[str, Any]:
    """The last JSON object a ``flwr ... --format json`` command printed (``{}`` if none)."""
    text = res.stdout.strip()
    start = text.rfind("\n{")
    try:
        payload = json.loads(text[start + 1:] if start >= 0 else text)
    except json.JSONDecodeError:
        return {}
    return payload if isinstance(payload, dict) else {}
