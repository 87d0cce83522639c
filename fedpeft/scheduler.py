"""Device-aware scheduler: one worker per device, each holding ONE base model for the whole run.

Each round's client tasks go into one FIFO queue. A worker thread per device (every visible CUDA
device; the CPU counts as one) pulls the next task and runs it on its model, swapping the
client's adapter state in and out; no model is reloaded or copied per client, so peak memory is
one model per device whatever the number of clients. A device never runs two tasks at once.

A failing task is retried once; if it fails again the client is dropped for the round, and if
fewer than ``min_clients`` tasks succeed the round raises :class:`RoundError` with every failed
client id and traceback. Errors are never swallowed silently.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fedpeft.errors import FedPeftError, RoundError

log = logging.getLogger(__name__)

W = TypeVar("W")  # what a worker holds: e.g. (model, tokenizer) on its device
R = TypeVar("R")


@dataclass
class Task(Generic[W, R]):
    """One unit of work: ``fn(worker_resource) -> result`` for client ``client_id``."""

    client_id: str
    fn: Callable[[W], R]


@dataclass
class Failure:
    client_id: str
    device: str
    traceback: str

    @property
    def reason(self) -> str:
        """The exception line of the traceback (``ValueError: ...``)."""
        lines = self.traceback.strip().splitlines()
        return lines[-1] if lines else "unknown error"


_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def share_malloc_arena() -> bool:
    """Make threads allocate host memory from glibc's main arena, as the main thread does.

    Without this, each worker thread gets its own arena. Those heaps are capped at 64 MB and
    trimmed eagerly. Training SmolLM2-135M in a worker thread then took ~6× the minor page faults
    and ran 5–9 % slower than the same steps on the main thread (see BENCHMARKS.md §1). With one
    CPU worker the shared arena has no contention. Returns whether the setting took (glibc only).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, 1))
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False


class DeviceScheduler(Generic[W]):
    """Run tasks FIFO on one worker per device.

    Args:
        devices: Device names, one worker each (``["cpu"]`` or ``["cuda:0", "cuda:1"]``).
        build: ``build(device) -> resource`` called once per worker (loads the model there).
        retries: Extra attempts for a failing task before its client is dropped.
    """

    def __init__(self, devices: list[str], build: Callable[[str], W], retries: int = 1) -> None:
        self.devices = list(devices)
        self.retries = retries
        self.resources: dict[str, W] = {}
        errors: list[BaseException] = []
        if any(d == "cpu" for d in self.devices):
            share_malloc_arena()

        def load(device: str) -> None:
            try:
                self.resources[device] = build(device)
            except BaseException as e:  # noqa: BLE001 - re-raised below in the caller's thread
                errors.append(e)

        threads = [threading.Thread(target=load, args=(d,)) for d in self.devices]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def call(self, fn: Callable[[W], R], device: str | None = None) -> R:
        """Run ``fn`` on one worker's resource (default: the first device) in this thread."""
        return fn(self.resources[device or self.devices[0]])

    def run(self, tasks: list[Task[W, R]], min_success: int = 1) -> tuple[dict[str, R], list[Failure]]:
        """Run ``tasks`` in FIFO order on all devices; return results by client id and failures.

        Raises:
            RoundError: if fewer than ``min_success`` tasks succeed.
        """
        pending: queue.Queue[Task[W, R]] = queue.Queue()
        for task in tasks:
            pending.put(task)
        results: dict[str, R] = {}
        failures: list[Failure] = []
        lock = threading.Lock()
        threads = [
            # daemon: Ctrl-C in the main thread ends the process without waiting for the queue
            threading.Thread(target=self._work, args=(d, pending, results, failures, lock), name=f"worker-{d}",
                             daemon=True)
            for d in self.devices
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if len(results) < min_success:
            details = "\n".join(f"--- client {f.client_id} on {f.device}:\n{f.traceback}" for f in failures)
            raise RoundError(
                f"only {len(results)} of {len(tasks)} clients finished, fewer than min_clients={min_success}. "
                f"Failed clients: {', '.join(f.client_id for f in failures)}\n{details}"
            )
        for f in failures:
            log.warning("client %s dropped for this round after %d attempts on %s", f.client_id, self.retries + 1, f.device)
        return results, failures

    def _work(self, device: str, pending: queue.Queue, results: dict, failures: list, lock: threading.Lock) -> None:
        resource = self.resources[device]
        while True:
            try:
                task = pending.get_nowait()
            except queue.Empty:
                return
            result, failure = self._attempt(device, resource, task)
            with lock:
                if failure is None:
                    results[task.client_id] = result
                else:
                    failures.append(failure)

    def _attempt(self, device: str, resource: Any, task: Task) -> tuple[Any, Failure | None]:
        tb = ""
        for attempt in range(self.retries + 1):
            log.info("device %s trains client %s (attempt %d)", device, task.client_id, attempt + 1)
            try:
                return task.fn(resource), None
            except FedPeftError as e:  # a known failure (e.g. a NaN loss): its message says what to do
                tb = f"{type(e).__name__}: {e}"
                log.debug("client %s failed:\n%s", task.client_id, traceback.format_exc())
                log.warning("client %s failed on %s (attempt %d): %s", task.client_id, device, attempt + 1, e)
            except Exception:  # noqa: BLE001 - recorded with its traceback, never swallowed
                tb = traceback.format_exc()
                log.warning("client %s failed on %s (attempt %d):\n%s", task.client_id, device, attempt + 1, tb)
        return None, Failure(task.client_id, device, tb)
