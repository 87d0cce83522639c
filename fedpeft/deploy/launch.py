"""Start a loopback Flower deployment as processes: SuperLink, N SuperNodes, then ``flwr run``.

Everything (FLWR_HOME of every process, logs, the generated app, certificates) lives under one
workspace directory; every wait is bounded. Typical use (see tests/deploy/test_prototype.py)::

    with Deployment(workspace) as dep:
        dep.start_superlink()
        for spec in nodes:
            dep.start_supernode(spec)
        run_id = dep.run({"num-server-rounds": 2, "output-dir": str(out), ...})
        status = dep.wait_for_run(run_id, timeout_s=90)   # "finished:completed"

Each process gets its own ``FLWR_HOME`` (``<workspace>/flwr-home/<name>``) because the SuperLink,
every SuperNode and the CLI all install the FAB under ``$FLWR_HOME/apps``; sharing one home
makes them race on the same directory.
"""

from __future__ import annotations

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.deploy.constants import NODE_CLIENT_ID, NODE_DATA_PATH
from fedpeft.deploy.tls import NodeKeys, TlsFiles

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr live here
CONNECTION = "fedpeft"  # SuperLink connection name in the CLI's config.toml
APP_NAME = "fedpeft-deploy"
_PROBE_INTERVAL_S = 0.5


class DeployError(RuntimeError):
    """A deployment process failed to start, exited early, or a run did not finish in time."""


@dataclass(frozen=True)
class NodeSpec:
    """One SuperNode: its client id, its data file and (with SuperNode auth) its keys."""

    client_id: str
    data_path: Path
    keys: NodeKeys | None = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def app_pyproject(run_config: dict[str, Any]) -> str:
    """The app's ``pyproject.toml``: components in ``fedpeft.deploy.apps`` plus the run config."""
    lines = [
        "[project]", f'name = "{APP_NAME}"', 'version = "0.1.0"',
        'description = "fedpeft on the Flower deployment runtime"', 'license = "Apache-2.0"',
        'dependencies = ["flwr>=1.42.0"]', "",
        "[tool.flwr.app]", 'publisher = "fedpeft"', "",
        "[tool.flwr.app.components]", 'serverapp = "fedpeft.deploy.apps:server_app"',
        'clientapp = "fedpeft.deploy.apps:client_app"', "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{key} = {json.dumps(value)}" for key, value in run_config.items()]
    return "\n".join(lines) + "\n"


class Deployment:
    """Processes of one loopback deployment; a context manager that always stops them.

    Args:
        workspace: Directory for everything the deployment writes.
        tls: Certificates for TLS; ``None`` runs insecure (plain HTTP on loopback).
        supernode_auth: Start the SuperLink with ``--enable-supernode-auth`` (needs ``tls``);
            nodes must then be registered with :meth:`register_node` before they start.
        startup_timeout_s: Bound on each wait for a process to come up.
    """

    def __init__(self, workspace: Path, *, tls: TlsFiles | None = None,
                 supernode_auth: bool = False, startup_timeout_s: float = 60.0) -> None:
        if supernode_auth and tls is None:
            raise DeployError("SuperNode authentication requires TLS (flwr refuses it insecure)")
        self.workspace = Path(workspace).resolve()
        self.tls = tls
        self.supernode_auth = supernode_auth
        self.startup_timeout_s = startup_timeout_s
        self.procs: dict[str, subprocess.Popen] = {}
        self.superlink_port: int | None = None
        (self.workspace / "logs").mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ processes

    def env(self, home: str) -> dict[str, str]:
        """Environment of a Flower process: private FLWR_HOME, no telemetry, fedpeft importable."""
        env = dict(os.environ)
        env.update({
            "FLWR_HOME": str(self.workspace / "flwr-home" / home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",  # else a background HTTPS call to api.flower.ai
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
            # SuperLink/SuperNode start `flower-superexec` by bare name: it must be on PATH.
            "PATH": os.pathsep.join([str(VENV_BIN), env.get("PATH", "")]),
            "PYTHONUNBUFFERED": "1",
            # SuperExec polls for app tasks every 1 s by default; the Fleet (SuperNode) and
            # Grid (ServerApp) polls are a fixed 3 s in flwr 1.42 and cannot be tuned.
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
        })
        return env

    def log_path(self, name: str) -> Path:
        """Combined stdout/stderr of process ``name``."""
        return self.workspace / "logs" / f"{name}.log"

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        with open(self.log_path(name), "ab") as log:
            # Own session: stop() can signal the process group (the SuperExec and app
            # subprocesses it starts) without touching anything else.
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(name),
                                    cwd=self.workspace, start_new_session=True)
        self.procs[name] = proc
        logger.info("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return proc

    def _tls_args_server(self) -> list[str]:
        if self.tls is None:
            return ["--insecure"]
        return ["--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile",
                str(self.tls.server_cert), "--ssl-keyfile", str(self.tls.server_key)]

    def start_superlink(self) -> int:
        """Start ``flower-superlink`` on a free port and wait for ``/health``; return the port."""
        self.superlink_port = free_port()
        argv = [str(VENV_BIN / "flower-superlink"), *self._tls_args_server(),
                "--host", "127.0.0.1", "--port", str(self.superlink_port),
                "--disable-runtime-dependency-installation"]
        if self.supernode_auth:
            argv.append("--enable-supernode-auth")
        proc = self._spawn("superlink", argv)
        self._wait_health(proc)
        self._write_cli_config()
        return self.superlink_port

    def start_supernode(self, spec: NodeSpec) -> subprocess.Popen:
        """Start ``flower-supernode`` for ``spec`` (its runtime API on its own free port)."""
        if self.superlink_port is None:
            raise DeployError("start_superlink() first")
        node_config = f'{NODE_CLIENT_ID}="{spec.client_id}" {NODE_DATA_PATH}="{spec.data_path}"'
        argv = [str(VENV_BIN / "flower-supernode"),
                "--superlink", f"127.0.0.1:{self.superlink_port}",
                "--port", str(free_port()), "--node-config", node_config,
                "--max-retries", "5", "--max-wait-time", str(self.startup_timeout_s)]
        argv += ["--insecure"] if self.tls is None else ["--root-certificates", str(self.tls.ca_cert)]
        if spec.keys is not None:
            argv += ["--auth-supernode-private-key", str(spec.keys.private_key)]
        proc = self._spawn(f"supernode-{spec.client_id}", argv)
        time.sleep(0.2)
        if proc.poll() is not None:
            raise DeployError(f"supernode {spec.client_id} exited with {proc.returncode}; see "
                              f"{self.log_path(f'supernode-{spec.client_id}')}")
        return proc

    def _wait_health(self, proc: subprocess.Popen) -> None:
        scheme = "http" if self.tls is None else "https"
        url = f"{scheme}://127.0.0.1:{self.superlink_port}/health"
        ctx = None if self.tls is None else ssl.create_default_context(cafile=str(self.tls.ca_cert))
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DeployError(f"superlink exited with {proc.returncode}; see "
                                  f"{self.log_path('superlink')}")
            try:
                with urllib.request.urlopen(url, timeout=2.0, context=ctx) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(_PROBE_INTERVAL_S)
        raise DeployError(f"superlink not healthy at {url} within {self.startup_timeout_s:.0f}s")

    # ------------------------------------------------------------------ flwr CLI

    def _write_cli_config(self) -> None:
        conn = [f"[superlink.{CONNECTION}]", f'address = "127.0.0.1:{self.superlink_port}"']
        conn += ["insecure = true"] if self.tls is None else [
            f'root-certificates = "{self.tls.ca_cert}"']
        text = "\n".join(["[superlink]", f'default = "{CONNECTION}"', "", *conn]) + "\n"
        path = self.workspace / "flwr-home" / "cli" / "config.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")

    def flwr(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
        """Run one ``flwr`` CLI command against this SuperLink (bounded by ``timeout_s``)."""
        return subprocess.run([str(VENV_BIN / "flwr"), *args], capture_output=True, text=True,
                              env=self.env("cli"), cwd=self.workspace, timeout=timeout_s)

    def register_node(self, keys: NodeKeys, name: str) -> int:
        """``flwr supernode register <pub>``: allow a key to join (SuperNode auth); node id."""
        res = self.flwr("supernode", "register", str(keys.public_key), CONNECTION,
                        "--name", name, "--format", "json")
        payload = _json_tail(res)
        if not payload.get("success"):
            raise DeployError(f"registering {name} failed: {res.stdout}{res.stderr}")
        return int(payload["node-id"])

    def write_app(self, run_config: dict[str, Any]) -> Path:
        """Write the app directory (``pyproject.toml`` only; the FAB is ~700 bytes)."""
        app_dir = self.workspace / "app"
        app_dir.mkdir(parents=True, exist_ok=True)
        (app_dir / "pyproject.toml").write_text(app_pyproject(run_config), encoding="utf-8")
        return app_dir

    def run(self, run_config: dict[str, Any], overrides: list[str] | None = None) -> int:
        """``flwr run <app> fedpeft --format json``; return the run id."""
        app_dir = self.write_app(run_config)
        args = ["run", str(app_dir), CONNECTION, "--format", "json"]
        for override in overrides or []:
            args += ["--run-config", override]
        res = self.flwr(*args)
        payload = _json_tail(res)
        if not payload.get("success"):
            raise DeployError(f"flwr run failed: {res.stdout}{res.stderr}")
        return int(payload["run-id"])

    def save_run_log(self, run_id: int) -> Path:
        """Write the ServerApp's log (``flwr log <id> --show``) to ``logs/run-<id>.log``."""
        res = self.flwr("log", str(run_id), CONNECTION, "--show")
        path = self.log_path(f"run-{run_id}")
        path.write_text(res.stdout + res.stderr, encoding="utf-8")
        return path

    def run_status(self, run_id: int) -> str:
        """Status text from ``flwr ls --run-id`` (``running``, ``finished:completed``, ...)."""
        res = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        runs = _json_tail(res).get("runs", [])
        return str(runs[0]["status"]) if runs else "unknown"

    def wait_for_run(self, run_id: int, timeout_s: float, poll_s: float = 1.0) -> str:
        """Poll the run until it is ``finished:*`` (bounded); return the final status.

        Raises:
            DeployError: if it is not finished after ``timeout_s`` or a process died.
        """
        deadline, status = time.monotonic() + timeout_s, "unknown"
        while time.monotonic() < deadline:
            status = self.run_status(run_id)
            if status.startswith("finished"):
                return status
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if "superlink" in dead:
                raise DeployError(f"superlink died ({dead}); see {self.log_path('superlink')}")
            time.sleep(poll_s)
        raise DeployError(f"run {run_id} not finished after {timeout_s:.0f}s (last: {status})")

    # ------------------------------------------------------------------ shutdown

    def stop_process(self, name: str, grace_s: float = 5.0) -> None:
        """SIGTERM the process group of ``name``, SIGKILL it after ``grace_s``."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
            try:
                os.killpg(proc.pid, sig)  # the group we created with start_new_session
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def stop(self) -> None:
        """Stop SuperNodes first, then the SuperLink."""
        for name in sorted(self.procs, key=lambda n: n == "superlink"):
            self.stop_process(name)


def _json_tail(res: subprocess.CompletedProcess) -> dict[str, Any]:
    """The last JSON object printed by a ``flwr ... --format json`` command ({} if none)."""
    text = res.stdout.strip()
    start = text.rfind("\n{")
    candidate = text[start + 1:] if start >= 0 else text
    try:
        payload = json.loads(candidate)
    except json.JSONDecodeError:
        return {}
    return payload if isinstance(payload, dict) else {}
