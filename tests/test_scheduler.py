"""Scheduler: FIFO on one worker per device, never two tasks at once on a device, failures handled."""

from __future__ import annotations

import platform
import sys
import threading
import time

import pytest

from fedpeft.errors import RoundError
from fedpeft.scheduler import DeviceScheduler, Task, share_malloc_arena


class Resource:
    def __init__(self, device: str) -> None:
        self.device = device
        self.busy = 0
        self.max_busy = 0
        self.lock = threading.Lock()


def _task(order: list, log_lock: threading.Lock, cid: str, seconds: float = 0.01):
    def fn(res: Resource) -> str:
        with res.lock:
            res.busy += 1
            res.max_busy = max(res.max_busy, res.busy)
        with log_lock:
            order.append((cid, res.device))
        time.sleep(seconds)
        with res.lock:
            res.busy -= 1
        return f"{cid}@{res.device}"

    return Task(cid, fn)


def test_one_task_at_a_time_per_device_and_fifo():
    built = []
    sched = DeviceScheduler(["cuda:0", "cuda:1", "cuda:2"], lambda d: built.append(d) or Resource(d))
    assert sorted(built) == ["cuda:0", "cuda:1", "cuda:2"]  # one resource per device, built once
    order: list = []
    lock = threading.Lock()
    tasks = [_task(order, lock, f"c{i}") for i in range(12)]
    results, failures = sched.run(tasks)
    assert not failures and set(results) == {f"c{i}" for i in range(12)}
    assert all(r.max_busy == 1 for r in sched.resources.values())
    assert [c for c, _ in order][:3] and sorted(c for c, _ in order[:3]) == ["c0", "c1", "c2"]  # FIFO start
    assert {d for _, d in order} == {"cuda:0", "cuda:1", "cuda:2"}
    results2, _ = sched.run(tasks[:2])  # the same resources serve later rounds: nothing rebuilt
    assert len(built) == 3 and len(results2) == 2


def test_single_device_runs_tasks_in_submission_order():
    sched = DeviceScheduler(["cpu"], Resource)
    order: list = []
    lock = threading.Lock()
    sched.run([_task(order, lock, f"c{i}", 0) for i in range(5)])
    assert [c for c, _ in order] == ["c0", "c1", "c2", "c3", "c4"]


def test_flaky_client_is_retried_once_and_succeeds():
    calls = {"n": 0}

    def flaky(res):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("transient")
        return "ok"

    results, failures = DeviceScheduler(["cpu"], Resource).run([Task("a", flaky)])
    assert results == {"a": "ok"} and not failures and calls["n"] == 2


def _broken(res):
    raise ValueError("client data is corrupt")


def test_failing_client_is_dropped_when_min_clients_hold():
    sched = DeviceScheduler(["cpu"], Resource)
    results, failures = sched.run([Task("good", lambda r: 1), Task("bad", _broken)], min_success=1)
    assert results == {"good": 1}
    assert [f.client_id for f in failures] == ["bad"] and "client data is corrupt" in failures[0].traceback


def test_round_fails_with_client_id_and_traceback_below_min_clients():
    sched = DeviceScheduler(["cpu"], Resource)
    with pytest.raises(RoundError) as e:
        sched.run([Task("good", lambda r: 1), Task("bad", _broken)], min_success=2)
    assert "bad" in str(e.value) and "ValueError: client data is corrupt" in str(e.value)


def test_worker_build_error_is_raised():
    def build(device):
        raise OSError("out of memory on " + device)

    with pytest.raises(OSError, match="out of memory on cpu"):
        DeviceScheduler(["cpu"], build)


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_cpu_workers_share_the_main_malloc_arena_on_glibc():
    # glibc accepts the setting (mallopt returns 1); worker threads then allocate like the main thread
    assert share_malloc_arena() is True


def test_a_known_failure_is_logged_in_one_line_without_a_traceback(caplog):
    from fedpeft.errors import TrainingError

    def nan_loss(resource):
        raise TrainingError("client bad: the training loss is nan")

    sched = DeviceScheduler(["cpu"], Resource)
    with caplog.at_level("WARNING"):
        _, failures = sched.run([Task("good", lambda r: 1), Task("bad", nan_loss)], min_success=1)
    assert "Traceback" not in caplog.text and "the training loss is nan" in caplog.text
    assert failures[0].traceback == "TrainingError: client bad: the training loss is nan"
