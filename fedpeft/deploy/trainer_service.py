"""A site's long-lived trainer: the model stays loaded between rounds, as in the simulation.

flwr 1.42 runs every message in a fresh ``flwr-clientapp`` process; importing torch,
transformers and peft and loading the model there would cost 10-20 s per round. So
``fedpeft client`` keeps one :class:`TrainerServer` in its own process, listening on a Unix
socket in the site's workspace (mode 0600), and the light ClientApp hands each training request
to it (:func:`request_training`). Requests carry JSON and safetensors bytes, never pickles.

Frame: ``>Q`` header length, UTF-8 JSON header, ``>Q`` payload length, payload (safetensors of
a ``dict[str, numpy.ndarray]``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

from fedpeft.scheduler import share_malloc_arena

log = logging.getLogger(__name__)

ERROR = "error"
_LEN = struct.Struct(">Q")
_MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to ~104-108 bytes


def _send(sock: socket.socket, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    head = json.dumps(header).encode()
    body = save_arrays({k: np.ascontiguousarray(v) for k, v in arrays.items()}) if arrays else b""
    sock.sendall(_LEN.pack(len(head)) + head + _LEN.pack(len(body)) + body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("the site trainer closed the connection mid-message")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    header = json.loads(_recv_exact(sock, _LEN.unpack(_recv_exact(sock, _LEN.size))[0]))
    size = _LEN.unpack(_recv_exact(sock, _LEN.size))[0]
    return header, (load_arrays(_recv_exact(sock, size)) if size else {})


def request_training(socket_path: str, config: dict[str, Any], state: dict[str, np.ndarray],
                     timeout_s: float) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Ask the site's trainer to train from ``state``; return ``(header, new_state)``.

    The header holds ``num_examples``, ``metrics`` and ``client_id``, or ``error`` (the
    exception type only) if training failed.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(socket_path)
        _send(sock, config, state)
        return _recv(sock)


class TrainerServer:
    """Serves training requests on ``socket_path`` with ``train_fn``, one at a time.

    Args:
        socket_path: Unix socket to create (its folder must be private to the site).
        train_fn: ``(config, state) -> (num_examples, metrics, client_id, new_state)``.
    """

    def __init__(self, socket_path: Path, train_fn) -> None:
        if len(str(socket_path)) > _MAX_SOCKET_PATH:
            raise OSError(f"socket path {socket_path} is longer than {_MAX_SOCKET_PATH} bytes; "
                          "give fedpeft client a shorter --workspace")
        self.path = socket_path
        socket_path.unlink(missing_ok=True)
        train = train_fn

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                config, state = _recv(self.request)
                try:
                    n, metrics, client_id, new_state = train(config, state)
                except Exception as e:  # noqa: BLE001 - logged here, reported by type only
                    log.exception("training failed")
                    _send(self.request, {ERROR: type(e).__name__}, {})
                    return
                _send(self.request, {"num_examples": n, "metrics": metrics, "client_id": client_id},
                      new_state)

        old_umask = os.umask(0o177)  # the socket file is created 0600
        try:
            self.server = socketserver.UnixStreamServer(str(socket_path), Handler)
        finally:
            os.umask(old_umask)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.5},
                                       daemon=True)

    def __enter__(self) -> TrainerServer:
        share_malloc_arena()  # training runs in the server's thread: let it allocate like the main thread
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.path.unlink(missing_ok=True)
