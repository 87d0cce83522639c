"""Where a worker's memory goes: base weights, adapter + optimizer, peak activations.

:func:`breakdown_once` wraps the first local training of each worker's model and logs one line
(and returns the numbers, which the trainer adds to that client's metrics as ``memory_*``):

* base weights: bytes of the frozen parameters and buffers, as stored (4-bit weights count their
  packed bytes);
* adapter + optimizer: trainable parameters x (weight + gradient + AdamW's two moments);
* peak activations: on CUDA, ``max_memory_allocated`` above what was allocated when training
  started; on CPU, the process's peak resident memory above its level when training started
  (after one read of every weight page, so memory-mapped weights count as weights), sampled every
  :data:`SAMPLE_SECONDS` by a thread; it includes what the allocator keeps.

:func:`release_freed_memory` hands memory that glibc's allocator keeps after a phase back to
the system (``malloc_trim``), so the next phase, and other processes, start lower.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

log = logging.getLogger(__name__)

SAMPLE_SECONDS = 0.002
_LOGGED = "_fedpeft_memory_logged"
_ADAM_COPIES = 4  # weight, gradient, exp_avg, exp_avg_sq


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """``(frozen, trainable)`` bytes of the model's parameters (buffers count as frozen)."""
    frozen = sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = 0
    for p in model.parameters():
        if p.requires_grad:
            trainable += p.numel() * p.element_size()
        else:
            frozen += p.numel() * p.element_size()
    return frozen, trainable


def rss_bytes() -> int:
    """The process's resident memory now (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _page_size()
    except (OSError, ValueError, IndexError):
        return 0


def peak_memory_bytes(device: torch.device | str) -> int:
    """The process's peak memory so far: CUDA ``max_memory_allocated`` on a GPU, else peak RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


def _page_size() -> int:
    import resource

    return resource.getpagesize()


class PeakSampler:
    """Peak memory above the start, inside a ``with`` block (CUDA allocator or sampled RSS)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.start, self.peak = device, 0, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakSampler:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self.peak = rss_bytes()
            self._thread = threading.Thread(target=self._sample, name="fedpeft-memory", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())

    @property
    def above_start(self) -> int:
        return max(self.peak - self.start, 0)


@contextmanager
def breakdown_once(model: nn.Module, client_id: str, batch_size: int, max_tokens: int) -> Iterator[dict[str, int]]:
    """Measure the first training on ``model``; the yielded dict is filled on exit (empty later)."""
    numbers: dict[str, int] = {}
    if getattr(model, _LOGGED, False):
        yield numbers
        return
    object.__setattr__(model, _LOGGED, True)
    device = next(model.parameters()).device
    frozen, trainable = weight_bytes(model)
    if device.type == "cpu":
        _touch(model)  # memory-mapped weights count once read: read them now, not inside the training peak
    with PeakSampler(device) as sampler:
        yield numbers
    numbers.update(memory_base_weights_bytes=frozen, memory_adapter_optimizer_bytes=trainable * _ADAM_COPIES,
                   memory_peak_activation_bytes=sampler.above_start)
    kind = "allocated" if device.type == "cuda" else "resident, sampled"
    log.info("memory on %s (%s, first training): base weights %s · adapter + AdamW %s · peak activations %s "
             "(%s; batches of %d × ≤%d tokens)", device, client_id, _mb(frozen), _mb(trainable * _ADAM_COPIES),
             _mb(sampler.above_start), kind, batch_size, max_tokens)


def _touch(model: nn.Module) -> None:
    """Read every parameter once (safetensors weights are memory-mapped: pages count when first read)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.numel():
                p.view(-1)[:: max(1, 4096 // p.element_size())].sum()  # one value per page


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def release_freed_memory() -> bool:
    """Return freed heap memory to the system (glibc ``malloc_trim``); whether it ran."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):  # not glibc
        return False
