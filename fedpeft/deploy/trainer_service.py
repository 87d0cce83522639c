"""A site's long-lived trainer: the model stays loaded between rounds, as in the simulation.

flwr 1.42 runs every message in a fresh ``flwr-clientapp`` process; importing torch,
transformers and peft and loading the model there would cost 10-20 s per round. So
``fedpeft client`` keeps one :class:`TrainerServer` in its own process, listening on a Unix
socket in the site's workspace, and the light ClientApp hands each training request to it
(:func:`request_training`).

The socket is a :mod:`multiprocessing.connection` ``Listener`` (``AF_UNIX``, mode 0600) with an
``authkey``: a random key made per ``fedpeft client`` process and kept in a 0600 file beside
the socket, so only a process that can read the site's workspace may ask for training. Each
message is two ``send_bytes`` frames, a UTF-8 JSON header and safetensors bytes of a
``dict[str, numpy.ndarray]``; ``Connection.send``/``recv`` (pickle) are never used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

from fedpeft.deploy.site_policy import SiteRefusal
from fedpeft.scheduler import share_malloc_arena

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
TrainFn = Callable[[dict[str, Any], Arrays], tuple[int, dict, str, Arrays]]

ERROR = "error"  # reply header: the exception type of a failed request
REASON = "reason"  # reply header: why, for errors whose message may leave the site (SiteRefusal)
FAMILY = "AF_UNIX"
_KEY_BYTES = 32
MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to ~104-108 bytes


def write_authkey(path: Path) -> bytes:
    """Write a fresh random key to ``path`` (mode 0600, created anew) and return it."""
    key = secrets.token_bytes(_KEY_BYTES)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


def _send(conn: Connection, header: dict[str, Any], arrays: Arrays) -> None:
    conn.send_bytes(json.dumps(header).encode())
    conn.send_bytes(save_arrays({k: np.ascontiguousarray(v) for k, v in arrays.items()}) if arrays else b"")


def _recv(conn: Connection) -> tuple[dict[str, Any], Arrays]:
    header = json.loads(conn.recv_bytes())
    body = conn.recv_bytes()
    return header, (load_arrays(body) if body else {})


def request_training(socket_path: str | Path, key_path: str | Path, config: dict[str, Any], state: Arrays,
                     timeout_s: float) -> tuple[dict[str, Any], Arrays]:
    """Ask the site's trainer to train from ``state``; return ``(header, new_state)``.

    Args:
        socket_path: The trainer's socket (node config ``trainer-socket``).
        key_path: The file holding its key (node config ``trainer-key``).
        config: The server's training config (JSON-able).
        state: The global state to start from.
        timeout_s: How long to wait for the trainer's answer.

    Returns:
        The header holds ``num_examples``, ``metrics`` and ``client_id``, or ``error`` (the
        exception type) and, for a refused job, ``reason``.

    Raises:
        TimeoutError: if the trainer does not answer within ``timeout_s``.
        multiprocessing.AuthenticationError: if the key does not match the trainer's.
    """
    authkey = Path(key_path).read_bytes()
    with Client(str(socket_path), family=FAMILY, authkey=authkey) as conn:
        _send(conn, config, state)
        if not conn.poll(timeout_s):
            raise TimeoutError(f"the site's trainer did not answer within {timeout_s:.0f} s")
        return _recv(conn)


class TrainerServer:
    """Serves training requests on ``socket_path`` with ``train_fn``, one at a time.

    Args:
        socket_path: Unix socket to create (its folder must be private to the site).
        key_path: File to write the socket's key to (mode 0600); removed on exit.
        train_fn: ``(config, state) -> (num_examples, metrics, client_id, new_state)``.

    Raises:
        OSError: if ``socket_path`` is too long for a Unix socket.
    """

    def __init__(self, socket_path: Path, key_path: Path, train_fn: TrainFn) -> None:
        if len(str(socket_path)) > MAX_SOCKET_PATH:
            raise OSError(f"socket path {socket_path} is longer than {MAX_SOCKET_PATH} bytes; "
                          "give fedpeft client a shorter --workspace")
        self.path, self.key_path, self._train = socket_path, key_path, train_fn
        self._authkey = write_authkey(key_path)
        self._one_at_a_time = threading.Lock()
        self._stopping = threading.Event()
        socket_path.unlink(missing_ok=True)
        old_umask = os.umask(0o177)  # the socket file is created 0600
        try:
            self._listener = Listener(str(socket_path), family=FAMILY, backlog=8, authkey=self._authkey)
        finally:
            os.umask(old_umask)
        self._thread = threading.Thread(target=self._accept_loop, name="trainer-service", daemon=True)

    def __enter__(self) -> TrainerServer:
        share_malloc_arena()  # training runs in request threads: let them allocate like the main thread
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        # Wake accept(), which blocks until a client connects. A bare connection, not a Client: its
        # handshake would wait forever if the loop had already seen the stop flag.
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as poke:
            poke.connect(str(self.path))
        self._thread.join(timeout=5.0)
        self._listener.close()  # removes the socket file
        self.path.unlink(missing_ok=True)
        self.key_path.unlink(missing_ok=True)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn = self._listener.accept()  # authenticates the client (HMAC challenge both ways)
            except Exception as e:  # noqa: BLE001 - a bad client must not stop the service
                if self._stopping.is_set():
                    return
                log.warning("refused a connection to the site's trainer: %s: %s", type(e).__name__, e)
                continue
            if self._stopping.is_set():
                conn.close()
                return
            # A thread per request, so a new client's handshake never waits behind a training run.
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        with conn:
            try:
                config, state = _recv(conn)
            except (EOFError, OSError, ValueError) as e:
                log.warning("unreadable request to the site's trainer: %s: %s", type(e).__name__, e)
                return
            with self._one_at_a_time:
                header, arrays = self._answer(config, state)
            try:
                _send(conn, header, arrays)
            except OSError as e:  # the ClientApp gave up (timeout) or died
                log.warning("could not send the training result back: %s", e)

    def _answer(self, config: dict[str, Any], state: Arrays) -> tuple[dict[str, Any], Arrays]:
        try:
            n, metrics, client_id, new_state = self._train(config, state)
        except SiteRefusal as e:  # its message names only what the server asked for
            log.error("%s", e)
            return {ERROR: type(e).__name__, REASON: str(e)}, {}
        except Exception as e:  # noqa: BLE001 - logged here, reported by type only
            log.exception("training failed")
            return {ERROR: type(e).__name__}, {}
        return {"num_examples": n, "metrics": metrics, "client_id": client_id}, new_state
