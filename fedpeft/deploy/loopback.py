"""A whole deployment on one machine, through the user commands (tests, demo, measurements).

:class:`Loopback` writes ``job.yaml`` and ``deploy.yaml``, starts ``fedpeft server`` and one
``fedpeft client`` per site as processes on 127.0.0.1 (each in its own session), and stops all
of them on exit. Every file it or Flower writes stays under its root folder, and every wait is
bounded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from fedpeft.deploy import constants as C
from fedpeft.deploy.launch import free_port, spawn, stop_group
from fedpeft.deploy.client_command import SUPERNODE_PID_FILE
from fedpeft.deploy.tls import NodeKeys, make_node_keys, make_tls_files

FEDPEFT = [sys.executable, "-m", "fedpeft.cli"]


class Loopback:
    """Server and sites of one loopback deployment; a context manager that stops them all.

    Args:
        root: Folder for everything (configs, certificates, keys, run folder, site workspaces).
        job: The job config as a dict (``workspace``/``run_id`` are set here).
        sites: Site name -> its JSONL file, in site-index order.
        tls: Make a CA and use TLS (else ``insecure: true``).
        authenticate: Register each site's key (needs ``tls``).
        deploy: Extra ``deploy.yaml`` keys (``secure_aggregation``, timeouts...).
        env: Extra environment of every process (e.g. ``OMP_NUM_THREADS``).
    """

    def __init__(self, root: Path, job: dict[str, Any], sites: dict[str, Path], *, tls: bool = False,
                 authenticate: bool = False, deploy: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.root = Path(root).resolve()
        self.sites = dict(sites)
        self.env = {**os.environ, "COLUMNS": "240", **(env or {})}  # rich wraps at 80 otherwise
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = free_port()
        self.tls = make_tls_files(self.root / "certs") if tls else None
        self.keys: dict[str, NodeKeys] = {n: make_node_keys(self.root / "keys", n)
                                          for n in sites} if authenticate else {}
        self.job = {**job, "workspace": str(self.root / "ws"), "run_id": "deploy"}
        self.run_dir = self.root / "ws" / str(self.job.get("job", "fedpeft")) / "deploy"
        self.deploy = {"listen": f"127.0.0.1:{self.port}", "authenticate": authenticate,
                       "sites": [{"name": n, **({"public_key": str(self.keys[n].public_key)}
                                              if authenticate else {})} for n in sites],
                       **({"tls": {"ca_cert": str(self.tls.ca_cert), "server_cert": str(self.tls.server_cert),
                                   "server_key": str(self.tls.server_key)}} if tls else {"insecure": True}),
                       **(deploy or {})}
        (self.root / "logs").mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self, name: str) -> Path:
        """Combined output of process ``name`` (``server`` or a site name)."""
        return self.root / "logs" / f"{name}.log"

    def start_server(self) -> subprocess.Popen:
        """Write the configs and start ``fedpeft server job.yaml --deploy deploy.yaml``."""
        job_path, deploy_path = self.root / "job.yaml", self.root / "deploy.yaml"
        job_path.write_text(yaml.safe_dump(self.job, sort_keys=False), encoding="utf-8")
        deploy_path.write_text(yaml.safe_dump(self.deploy, sort_keys=False), encoding="utf-8")
        return self._start("server", [*FEDPEFT, "server", str(job_path), "--deploy", str(deploy_path)])

    def start(self, timeout_s: float = 90.0) -> None:
        """Start the server, wait until its run has started, then start every site."""
        self.start_server()
        if not self.wait_for_log("server", "ready: sites connect to", timeout_s):
            raise TimeoutError(f"fedpeft server did not start its run within {timeout_s:.0f}s; "
                               f"see {self.log('server')}")
        for name in self.sites:
            self.start_site(name)

    def start_site(self, name: str, data: Path | None = None, key: NodeKeys | None = None,
                   command: list[str] | None = None) -> subprocess.Popen:
        """Start ``fedpeft client`` for site ``name`` (its own data file and key by default).

        ``command`` replaces ``python -m fedpeft.cli`` (the fault suite's hostile sites).
        """
        argv = [*(command or FEDPEFT), "client", "--server", f"127.0.0.1:{self.port}", "--name", name,
                "--data", str(data or self.sites[name]), "--workspace", str(self.root / "sites" / name),
                "--retry-for", "120"]
        argv += ["--insecure"] if self.tls is None else ["--root-certificates", str(self.tls.ca_cert)]
        key = key or self.keys.get(name)
        if key is not None:
            argv += ["--auth-key", str(key.private_key)]
        return self._start(name, argv)

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        proc = spawn(argv, self.env, self.log(name), self.root)
        self.procs[name] = proc
        return proc

    def wait_for_log(self, name: str, text: str, timeout_s: float, count: int = 1) -> bool:
        """Wait (bounded) until ``text`` appears ``count`` times in process ``name``'s log."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            path = self.log(name)
            if path.is_file() and path.read_text(errors="replace").count(text) >= count:
                return True
            time.sleep(0.2)
        return False

    def wait_server(self, timeout_s: float) -> int:
        """Exit code of ``fedpeft server`` (it exits when the run ends); bounded by ``timeout_s``."""
        try:
            return self.procs["server"].wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return -1

    def kill_site(self, name: str) -> None:
        """Crash a site: SIGKILL its ``fedpeft client`` and its SuperNode's process groups."""
        pid_file = self.root / "sites" / name / SUPERNODE_PID_FILE
        groups = [self.procs[name].pid] + ([int(pid_file.read_text())] if pid_file.is_file() else [])
        for pgid in groups:
            _kill_group(pgid)
        self.procs[name].wait(timeout=10)

    def stop(self) -> None:
        """Stop the sites, then the server (each whole process group; bounded)."""
        for name in sorted(self.procs, key=lambda n: n == "server"):
            stop_group(self.procs[name], grace_s=15.0)
            pid_file = self.root / "sites" / name / SUPERNODE_PID_FILE
            if name != "server" and pid_file.is_file():  # in case its client was killed first
                _kill_group(int(pid_file.read_text()))

    def metrics(self) -> list[dict]:
        """The run's ``metrics.jsonl`` records."""
        from fedpeft.io_utils import read_jsonl

        return read_jsonl(self.run_dir / "metrics.jsonl")

    def serverapp_log(self) -> str:
        path = self.run_dir / C.FLOWER_DIR / C.LOGS_DIR / C.SERVERAPP_LOG
        return path.read_text(errors="replace") if path.is_file() else ""


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
