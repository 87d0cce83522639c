"""The fault suite's toolkit: running the CLI, the shared tiny job, classifying outcomes, reference runs,
the case registry. The cases are in :mod:`bench.fault_inputs` and :mod:`bench.fault_runs`; ``bench/faults.py`` runs them."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402


CLEAR, WORKED, UNCLEAR, TRACEBACK, SILENT, LOST = (
    "clear error", "worked", "unclear error", "traceback", "silent wrong result", "data lost")
CATEGORIES = [CLEAR, WORKED, UNCLEAR, TRACEBACK, SILENT, LOST]
GOAL_TEXT = "0 silent wrong results, 0 data lost, 0 tracebacks, at most 2 unclear errors"
TIMEOUT_S = 180
RUN = Path("ws/j/r1")  # every job writes here, relative to its case folder

# The shared tiny job: 2 IID clients x 2 rounds, one optimizer step each, 2 test questions.
JOB: dict[str, Any] = {
    "job": "j", "run_id": "r1", "workspace": "ws", "seed": 0,
    "model": {"name": "tiny-random-llama"}, "peft": {"method": "lora", "r": 2},
    "data": {"train": "builtin:sample", "test_ratio": 0.1, "max_seq_len": 64, "max_test_samples": 2},
    "federation": {"num_clients": 2, "rounds": 2},
    "train": {"learning_rate": 5e-3, "batch_size": 4, "max_steps": 1},
    "eval": {"max_new_tokens": 2, "max_samples": 2, "zero_shot": False, "metrics": ["rougeL"],
             "heldout_loss": False},
}
ROWS = [{"question": f"What is condition {i}?", "answer": f"Condition {i} is a made-up illness number {i}."}
        for i in range(24)]

# ------------------------------------------------------------------------------------------
# Running the CLI


@dataclass
class Proc:
    rc: int
    out: str  # stdout and stderr together


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "COLUMNS": "400", "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedpeft.cli", *args]


def cli(cwd: Path, *args: str, timeout: float = TIMEOUT_S) -> Proc:
    """Run ``fedpeft ARGS`` in ``cwd``; a timeout is a non-zero exit with that message."""
    try:
        p = subprocess.run(cli_cmd(*args), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
        return Proc(p.returncode, p.stdout + p.stderr)
    except subprocess.TimeoutExpired as e:
        return Proc(124, f"timed out after {timeout:.0f} s; {(e.stderr or b'')[-300:]!r}")


def _default_sigint() -> None:
    # A suite started in the background (`cmd &`) passes SIGINT as ignored, and Python then never
    # turns it into KeyboardInterrupt; the Ctrl-C case needs a terminal's default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(cli_cmd(*args), cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=_default_sigint)


def finish(p: subprocess.Popen, timeout: float = TIMEOUT_S) -> Proc:
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate(timeout=30)
        return Proc(124, f"timed out after {timeout:.0f} s")
    return Proc(p.returncode, out)


# ------------------------------------------------------------------------------------------
# Building inputs


def job(**dotted: Any) -> dict[str, Any]:
    """The shared job with dotted overrides (``None`` removes a key)."""
    cfg = copy.deepcopy(JOB)
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return cfg


def write_job(d: Path, cfg: dict[str, Any] | str, name: str = "job.yaml") -> str:
    (d / name).write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False))
    return name


def write_jsonl(path: Path, rows: list[dict] | None = None, raw: str | None = None) -> str:
    path.write_text(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows or ROWS))
    return str(path)


# ------------------------------------------------------------------------------------------
# Reading outputs


def first_error_line(out: str) -> str:
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if re.search(r"error|refused|not |no |invalid|must|cannot|unknown", ln, re.I) and "WARNING" not in ln:
            return (f"{ln} {lines[i + 1]}" if ln.endswith(":") and i + 1 < len(lines) else ln)[:220]
    return (lines[-1] if lines else "(no output)")[:220]


def exception_line(out: str) -> str:
    """The last line of the last traceback in ``out``: the exception and its message."""
    tail = out.split("Traceback (most recent call last)")[-1]
    lines = [ln.strip() for ln in tail.splitlines() if re.match(r"[\w.]+(Error|Exception|Interrupt)\b", ln.strip())]
    return (lines[-1] if lines else first_error_line(tail))[:220]


def expect_error(p: Proc, *needles: str, accepted: str = "exit 0: the fault was accepted") -> tuple[str, str]:
    """A non-zero exit whose message matches every regex in ``needles`` is a clear error."""
    if "Traceback (most recent call last)" in p.out:
        return TRACEBACK, exception_line(p.out)
    if p.rc == 0:
        return SILENT, accepted
    if p.rc == 124 and p.out.startswith("timed out"):
        return UNCLEAR, p.out[:220]
    flat = re.sub(r"\s+", " ", p.out)
    missing = [n for n in needles if not re.search(n, flat, re.I)]
    line = first_error_line(p.out)
    return (UNCLEAR, f"{line} (does not name {', '.join(missing)})") if missing else (CLEAR, line)


def state_finite(path: Path) -> bool:
    from safetensors.torch import load_file

    return all(bool(t.float().isfinite().all()) for t in load_file(str(path)).values())


def metric_rounds(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
    return [r["round"] for r in map(json.loads, lines) if r.get("event", "round") == "round"]


def check_run(d: Path, p: Proc, rounds: int = 2, ref: Path | None = None) -> tuple[str, str]:
    """Exit 0, summary, finite adapter, rounds 1..R once each, and (with ``ref``) bit-equal to it."""
    run = d / RUN
    if "Traceback (most recent call last)" in p.out:
        return TRACEBACK, exception_line(p.out)
    if p.rc != 0:
        return UNCLEAR, f"exit {p.rc}: {first_error_line(p.out)}"  # a fault that should have worked
    adapter = run / "adapter" / "adapter_model.safetensors"
    if not (run / "summary.json").is_file() or not adapter.is_file():
        return SILENT, "exit 0 without summary.json or adapter/"
    if not state_finite(adapter):
        return SILENT, "exit 0 with a non-finite adapter"
    got = metric_rounds(run)
    if got != list(range(1, rounds + 1)):
        return SILENT, f"metrics.jsonl rounds {got}, expected 1..{rounds}"
    if ref is not None:
        final = ("adapter/adapter_model.safetensors", f"checkpoints/round-{rounds:04d}/global_state.safetensors")
        same = [f for f in final
                if (run / f).read_bytes() == (ref / f).read_bytes()]
        if len(same) < 2:
            return SILENT, "final adapter differs from the uninterrupted run"
        return WORKED, f"rounds 1..{rounds}, adapter bit-equal to an uninterrupted run"
    return WORKED, f"rounds 1..{rounds}, finite adapter"


# ------------------------------------------------------------------------------------------
# Reference runs (computed once, copied into the cases that need them)

_REFS: dict[int, Path] = {}
_REF_LOCK = threading.Lock()
_REF_ROOT: list[Path] = []


def ref(rounds: int) -> Path:
    """The run folder of an uninterrupted ``rounds``-round run of the shared job."""
    with _REF_LOCK:
        if rounds not in _REFS:
            d = Path(tempfile.mkdtemp(prefix=f"ref{rounds}-", dir=_REF_ROOT[0]))
            p = cli(d, "run", write_job(d, job(**{"federation.rounds": rounds})))
            if p.rc != 0:
                raise RuntimeError(f"the reference run failed: {p.out[-2000:]}")
            _REFS[rounds] = d / RUN
        return _REFS[rounds]


def copy_ref(d: Path, rounds: int) -> Path:
    shutil.copytree(ref(rounds), d / RUN)
    (d / RUN / ".lock").unlink(missing_ok=True)
    return d / RUN


def make_partial(run: Path, keep: int) -> None:
    """Turn a finished run into one killed right after checkpoint ``keep``."""
    for ck in (run / "checkpoints").glob("round-*"):
        if int(ck.name.split("-")[1]) > keep:
            shutil.rmtree(ck)
    (run / "checkpoints" / "latest").write_text(f"round-{keep:04d}")
    for name in ("summary.json", "predictions.jsonl"):
        (run / name).unlink(missing_ok=True)
    shutil.rmtree(run / "adapter", ignore_errors=True)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines if json.loads(ln).get("round", 0) <= keep))


def partial(d: Path, rounds: int = 3, keep: int = 2) -> Path:
    run = copy_ref(d, rounds)
    make_partial(run, keep)
    return run


def latest_state(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip() / "global_state.safetensors"


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0xFF
    elif how == "truncate":
        data = data[: len(data) // 2]
    elif how == "empty":
        data = bytearray()
    path.write_bytes(bytes(data))


def data_job(raw: str | None = None, rows: list[dict] | None = None, **more: Any) -> Callable[[Path], dict]:
    """A job on a training file written from ``rows`` (or the ``raw`` text) in the case folder."""
    return lambda d: job(**{"data.train": write_jsonl(d / "train.jsonl", rows, raw), **more})


def plugin_job(d: Path, body: str) -> dict:
    """A job whose aggregator is the plugin file ``my_agg.py`` with ``body``, written in the case folder."""
    (d / "my_agg.py").write_text(body)
    return job(**{"federation.aggregation": {"name": f"{d / 'my_agg.py'}:MyAgg"}})


# ------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    group: str
    name: str
    fn: Callable[[Path], tuple[str, str]]
    quick: bool = False


CASES: list[Case] = []


def case(group: str, name: str, quick: bool = False) -> Callable:
    def register(fn: Callable[[Path], tuple[str, str]]) -> Callable:
        CASES.append(Case(group, name, fn, quick))
        return fn
    return register


def error_case(group: str, name: str, cfg: Callable[[Path], dict | str], *needles: str, quick: bool = False,
               args: tuple[str, ...] = (), cmd: str = "run") -> None:
    """A case whose job should be refused with a message matching ``needles``."""
    def fn(d: Path) -> tuple[str, str]:
        return expect_error(cli(d, cmd, write_job(d, cfg(d)), *args), *needles)
    CASES.append(Case(group, name, fn, quick))

