"""Fault suite: what does ``fedpeft`` do with bad data, bad configs, broken checkpoints and faulty clients?

Every case runs the ``fedpeft`` CLI in a subprocess (tiny model, 2-3 clients, 1-3 rounds, one
optimizer step per client) inside its own temporary folder, then CHECKS THE RESULT, not only the
exit code, and files the outcome in one category:

- ``clear error``: non-zero exit, a message naming the file / key / client, no traceback;
- ``worked``: exit 0 and the outputs are right (summary, finite adapter, one metrics line per round,
  a resumed adapter bit-equal to an uninterrupted run);
- ``unclear error``: non-zero exit, but the message does not say what or where;
- ``traceback``: a Python traceback was printed;
- ``silent wrong result``: exit 0 with a wrong output (NaN adapter, duplicated rounds, a bad
  config accepted...);
- ``data lost``: the outputs of an earlier run were destroyed.

    python bench/faults.py                  # every case (about 10 min on 2 cores)
    python bench/faults.py --quick          # 6 fast cases
    python bench/faults.py --only resume concurrency
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from bench.common import Column, Recorder, base_parser, markdown_table  # noqa: E402

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


def start(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(cli_cmd(*args), cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


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


# --- bad data ---------------------------------------------------------------------------

def _data(raw: str | None = None, rows: list[dict] | None = None, **more: Any) -> Callable[[Path], dict]:
    return lambda d: job(**{"data.train": write_jsonl(d / "train.jsonl", rows, raw), **more})


error_case("data", "missing data file", lambda d: job(**{"data.train": str(d / "nope.jsonl")}), "nope\\.jsonl",
           quick=True)
error_case("data", "empty data file", _data(raw=""), "train\\.jsonl")
error_case("data", "invalid JSON on line 3", _data(raw="".join(json.dumps(r) + "\n" for r in ROWS[:2]) + "{oops\n"
                                                   + "".join(json.dumps(r) + "\n" for r in ROWS[2:])),
           "train\\.jsonl", "\\b3\\b")
error_case("data", "a row without answer", _data(rows=ROWS[:4] + [{"question": "Q?"}] + ROWS[4:]), "train\\.jsonl",
           "answer")
error_case("data", "unknown field names", _data(rows=[{"prompt": r["question"], "completion": r["answer"]}
                                                      for r in ROWS]), "train\\.jsonl", "question|field")
error_case("data", "binary file", lambda d: job(**{"data.train": str(d / "train.jsonl")})
           if (d / "train.jsonl").write_bytes(bytes(range(256)) * 40) else {}, "train\\.jsonl")
error_case("data", "question_field names a missing field", _data(**{"data.question_field": "prompt"}), "prompt")
error_case("data", "answer is a number, not text", _data(rows=ROWS[:5] + [{"question": "Q?", "answer": 42}] + ROWS[5:]),
           "train\\.jsonl", "answer")
error_case("data", "missing test file", _data(**{"data.test": "/nonexistent/test.jsonl"}), "test\\.jsonl")
error_case("data", "client_files count mismatch", lambda d: job(**{
    "data.client_files": [write_jsonl(d / f"c{i}.jsonl") for i in range(3)], "data.train": None}),
    "client_files", "num_clients|2|3")
error_case("data", "an empty client file", lambda d: job(**{
    "data.client_files": [write_jsonl(d / "c0.jsonl"), write_jsonl(d / "c1.jsonl", raw="")], "data.train": None}),
    "c1\\.jsonl")
error_case("data", "a missing client file", lambda d: job(**{
    "data.client_files": [write_jsonl(d / "c0.jsonl"), str(d / "c9.jsonl")], "data.train": None}), "c9\\.jsonl")


@case("data", "UTF-8 BOM and CRLF line endings")
def _bom(d: Path) -> tuple[str, str]:
    raw = "\ufeff" + "".join(json.dumps(r) + "\r\n" for r in ROWS) + "\r\n\r\n"
    return check_run(d, cli(d, "run", write_job(d, _data(raw=raw)(d))))


@case("data", "duplicated rows with test_ratio: no question on both sides")
def _dups(d: Path) -> tuple[str, str]:
    rows = [r for r in ROWS for _ in range(2)]
    cfg = _data(rows=rows, **{"data.test_ratio": 0.25, "data.max_test_samples": None, "eval.max_samples": 40})(d)
    p = cli(d, "run", write_job(d, cfg))
    verdict = check_run(d, p)
    if verdict[0] != WORKED:
        return verdict
    asked = Counter(json.loads(ln)["question"] for ln in (d / RUN / "predictions.jsonl").read_text().splitlines())
    split = [q for q, n in asked.items() if n != 2]
    if split:
        return SILENT, f"{len(split)} test question(s) also in the training rows, e.g. {split[0]!r}"
    return WORKED, f"{len(asked)} duplicated questions all held out together"


@case("data", "fewer rows than clients")
def _few_rows(d: Path) -> tuple[str, str]:
    cfg = _data(rows=ROWS[:3], **{"federation.num_clients": 3, "data.test_ratio": 0.34})(d)
    p = cli(d, "run", write_job(d, cfg))
    if p.rc != 0:
        return expect_error(p, "client")
    parts = json.loads((d / RUN / "partitions.json").read_text())
    empty = '"num_examples": 0' in json.dumps(parts)
    return (SILENT if empty else WORKED), json.dumps(parts)[:200]


# --- bad config -------------------------------------------------------------------------

for _name, _over, _needles in [
    ("unknown key", {"train.learning_rat": 0.1}, ("learning_rat",)),
    ("misspelt aggregator", {"federation.aggregation": {"name": "fedavgg"}}, ("fedavgg",)),
    ("fedavgm beta: 5", {"federation.aggregation": {"name": "fedavgm", "beta": 5}}, ("beta",)),
    ("LoRA r: 0", {"peft.r": 0}, ("\\br\\b",)),
    ("LoRA alpha: 0", {"peft.alpha": 0}, ("alpha",)),
    ("clients_per_round: 2.5", {"federation.clients_per_round": 2.5}, ("clients_per_round",)),
    ("min_clients > num_clients", {"federation.min_clients": 5}, ("min_clients",)),
    ("negative learning rate", {"train.learning_rate": -0.1}, ("learning_rate",)),
    ("learning rate is a word", {"train.learning_rate": "fast"}, ("learning_rate",)),
    ("rounds: 0", {"federation.rounds": 0}, ("rounds",)),
    ("num_clients: 0", {"federation.num_clients": 0}, ("num_clients",)),
    ("max_seq_len: 8", {"data.max_seq_len": 8}, ("max_seq_len",)),
    ("unknown PEFT method", {"peft": {"method": "lorra"}}, ("lorra",)),
    ("unknown partitioner", {"federation.partition": {"method": "dirichlett"}}, ("dirichlett",)),
    ("unknown metric", {"eval.metrics": ["rougeX"]}, ("rougeX",)),
    ("unknown dtype", {"model.dtype": "float13"}, ("dtype|float13",)),
    ("target_modules match nothing", {"peft.target_modules": ["nothing_here"]}, ("nothing_here",)),
    ("model name that does not exist (offline)", {"model.name": "no-such-org/no-such-model"}, ("no-such-model",)),
]:
    error_case("config", _name, lambda d, o=_over: job(**o), *_needles,
               quick=_name in ("unknown key", "min_clients > num_clients"))

error_case("config", "empty YAML", lambda d: "", "job\\.yaml")
error_case("config", "comment-only YAML", lambda d: "# nothing here\n", "job\\.yaml")
error_case("config", "not-a-mapping YAML", lambda d: "- a\n- b\n", "job\\.yaml")
error_case("config", "YAML syntax error", lambda d: "job: j\nmodel: {name: x\n", "job\\.yaml")
error_case("config", "override without '='", lambda d: job(), "train\\.learning_rate", args=("train.learning_rate",))
error_case("config", "override of an unknown key", lambda d: job(), "train\\.lr", args=("train.lr=1",))
error_case("config", "validate lists every problem", lambda d: job(**{"peft.r": 0, "train.learning_rate": -1}),
           "\\br\\b", "learning_rate", cmd="validate")


@case("config", "duplicate key in YAML")
def _dup_key(d: Path) -> tuple[str, str]:
    p = cli(d, "run", write_job(d, yaml.safe_dump(job(), sort_keys=False) + "seed: 7\n"))
    if p.rc == 0 and (d / RUN / "config.yaml").is_file():
        seed = yaml.safe_load((d / RUN / "config.yaml").read_text()).get("seed")
        return SILENT, f"`seed: 0` then `seed: 7` in one file accepted; the run used seed {seed}, no warning"
    return expect_error(p, "seed")


def _plugin(d: Path, body: str) -> dict:
    (d / "my_agg.py").write_text(body)
    return job(**{"federation.aggregation": {"name": f"{d / 'my_agg.py'}:MyAgg"}})


error_case("config", "plugin file that raises on import",
           lambda d: _plugin(d, "raise RuntimeError('plugin broken on import')\n"), "my_agg\\.py")
error_case("config", "plugin class whose __init__ raises", lambda d: _plugin(
    d, "class MyAgg:\n    def __init__(self):\n        raise ValueError('bad init')\n"), "MyAgg|my_agg")
error_case("config", "plugin file that does not exist",
           lambda d: job(**{"federation.aggregation": {"name": f"{d / 'gone.py'}:MyAgg"}}), "gone\\.py")
error_case("config", "plugin class missing from its file", lambda d: _plugin(d, "class Other:\n    pass\n"),
           "MyAgg")

# --- faulty aggregation and clients --------------------------------------------------------

_AGG = """
import torch
from fedpeft.aggregators.fedavg import FedAvg

class MyAgg:
    def __init__(self):
        self.inner, self.calls = FedAvg(), 0
    def state_dict(self):
        return {{}}
    def load_state_dict(self, state):
        pass
    def step(self, global_state, mean_state):
        self.calls += 1
        new = self.inner.step(global_state, mean_state)
        if self.calls >= {bad_from}:
{body}
        return new
"""


def _agg_case(name: str, body: str, needles: tuple[str, ...], bad_from: int = 2) -> None:
    def fn(d: Path) -> tuple[str, str]:
        p = cli(d, "run", write_job(d, _plugin(d, _AGG.format(bad_from=bad_from, body=body))))
        verdict = expect_error(p, *needles)
        run = d / RUN
        if verdict[0] == CLEAR and bad_from == 2:
            cks = sorted(x.name for x in (run / "checkpoints").glob("round-*")) if run.is_dir() else []
            if cks != ["round-0001"] or not state_finite(latest_state(run)):
                return LOST, f"{verdict[1]}; but checkpoints left: {cks}"
            return CLEAR, f"{verdict[1]} (round-0001 kept)"
        return verdict
    CASES.append(Case("clients", name, fn))


_agg_case("aggregator returns NaN in round 2",
          "            new = {k: v * float('nan') for k, v in new.items()}", ("finite|nan",))
_agg_case("aggregator returns wrong shapes in round 2",
          "            new = {k: v[..., :1].clone() for k, v in new.items()}", ("shape",))
_agg_case("aggregator drops a key in round 2",
          "            new = dict(list(new.items())[1:])", ("key|missing",))
_agg_case("aggregator raises in round 2",
          "            raise RuntimeError('server optimizer exploded')", ("exploded|MyAgg|aggregat",))


@case("clients", "max_update_norm tiny: every client dropped")
def _norm(d: Path) -> tuple[str, str]:
    p = cli(d, "run", write_job(d, job(**{"federation.max_update_norm": 1e-12})))
    return expect_error(p, "client-0", "client-1")


@case("clients", "max_update_norm tiny, min_clients 2 of 3")
def _norm3(d: Path) -> tuple[str, str]:
    p = cli(d, "run", write_job(d, job(**{"federation.max_update_norm": 1e-12, "federation.num_clients": 3,
                                          "federation.min_clients": 2})))
    return expect_error(p, "client-0", "min_clients|2")


@case("clients", "clients_per_round 1 of 3: one client a round, dropped none")
def _sample1(d: Path) -> tuple[str, str]:
    p = cli(d, "run", write_job(d, job(**{"federation.clients_per_round": 1, "federation.num_clients": 3})))
    verdict = check_run(d, p)
    if verdict[0] != WORKED:
        return verdict
    recs = [json.loads(ln) for ln in (d / RUN / "metrics.jsonl").read_text().splitlines()]
    counts = [len(r["clients"]) for r in recs if "clients" in r]
    return (WORKED, f"clients per round {counts}") if counts == [1, 1] else (SILENT, f"clients per round {counts}")


@case("clients", "metric plugin that raises")
def _metric_raises(d: Path) -> tuple[str, str]:
    (d / "my_metric.py").write_text("def my_metric(*, predictions, references):\n    raise ValueError('bad metric')\n")
    p = cli(d, "run", write_job(d, job(**{"eval.metrics": [f"{d / 'my_metric.py'}:my_metric"]})))
    return expect_error(p, "my_metric")


# --- runs, checkpoints and resume ---------------------------------------------------------

@case("resume", "a normal run", quick=True)
def _normal(d: Path) -> tuple[str, str]:
    return check_run(d, cli(d, "run", write_job(d, job())))


def _kill_case(name: str, after: int) -> None:
    def fn(d: Path) -> tuple[str, str]:
        reference = ref(3)
        p = start(d, "run", write_job(d, job(**{"federation.rounds": 3})))
        target, deadline = d / RUN / "checkpoints" / f"round-{after:04d}", time.monotonic() + TIMEOUT_S
        while not target.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if p.poll() is not None:
            return UNCLEAR, f"the run ended (exit {p.returncode}) before it could be killed after round {after}"
        os.kill(p.pid, signal.SIGKILL)
        finish(p, 30)
        ck = sorted(x.name for x in (d / RUN / "checkpoints").glob("round-*"))
        kind, detail = check_run(d, cli(d, "run", "--resume", str(RUN)), rounds=3, ref=reference)
        return kind, f"killed with {ck}; {detail}"
    CASES.append(Case("resume", name, fn))


_kill_case("kill -9 when round 1's checkpoint appears, then --resume", 1)
_kill_case("kill -9 when round 2's checkpoint appears, then --resume", 2)


@case("resume", "kill -9 before the first checkpoint, then --resume")
def _kill_early(d: Path) -> tuple[str, str]:
    p = start(d, "run", write_job(d, job()))
    deadline = time.monotonic() + TIMEOUT_S
    while not (d / RUN / "config.yaml").exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    finish(p, 30)
    if (d / RUN / "checkpoints" / "latest").exists():
        return UNCLEAR, "the first checkpoint was already written when the kill landed"
    p = cli(d, "run", "--resume", str(RUN))
    if p.rc != 0:
        return expect_error(p, "checkpoint")
    kind, detail = check_run(d, p, ref=ref(2))
    return kind, f"no checkpoint: started over; {detail}"


@case("resume", "kill -9 before the first checkpoint, then run again")
def _kill_early_rerun(d: Path) -> tuple[str, str]:
    p = start(d, "run", write_job(d, job()))
    deadline = time.monotonic() + TIMEOUT_S
    while not (d / RUN / "config.yaml").exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    finish(p, 30)
    p = cli(d, "run", "job.yaml")
    return check_run(d, p) if p.rc == 0 else expect_error(p, "r1", "resume|run_id")


def _damage_case(name: str, how: str, quick: bool = False) -> None:
    def fn(d: Path) -> tuple[str, str]:
        run = partial(d)
        damage(latest_state(run), how)
        p = cli(d, "run", "--resume", str(RUN))
        warned = re.search(r"skipping checkpoint", p.out)
        kind, detail = check_run(d, p, rounds=3, ref=ref(3))
        if kind == WORKED and not warned:
            return SILENT, f"{detail}, but no warning about the damaged checkpoint"
        return kind, (f"warned, fell back to round 1; {detail}" if kind == WORKED else detail)
    CASES.append(Case("resume", name, fn, quick))


_damage_case("flipped byte in the latest global_state.safetensors", "flip", quick=True)
_damage_case("truncated latest global_state.safetensors", "truncate")
_damage_case("empty latest global_state.safetensors", "empty")


@case("resume", "latest checkpoint.json missing")
def _no_meta(d: Path) -> tuple[str, str]:
    run = partial(d)
    (latest_state(run).parent / "checkpoint.json").unlink()
    return check_run(d, cli(d, "run", "--resume", str(RUN)), rounds=3, ref=ref(3))


@case("resume", "'latest' names a missing round")
def _latest_missing(d: Path) -> tuple[str, str]:
    run = partial(d)
    (run / "checkpoints" / "latest").write_text("round-0009")
    return check_run(d, cli(d, "run", "--resume", str(RUN)), rounds=3, ref=ref(3))


@case("resume", "every checkpoint corrupted")
def _all_bad(d: Path) -> tuple[str, str]:
    run = partial(d)
    for f in (run / "checkpoints").glob("round-*/global_state.safetensors"):
        damage(f, "flip")
    return expect_error(cli(d, "run", "--resume", str(RUN)), "checkpoint", "round-000")


@case("resume", "edited config.yaml (learning rate) on resume")
def _edited(d: Path) -> tuple[str, str]:
    run = partial(d)
    cfg = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(re.sub(r"learning_rate: .*", "learning_rate: 0.5", cfg))
    return expect_error(cli(d, "run", "--resume", str(RUN)), "learning_rate")


def _more_rounds(d: Path) -> Path:
    run = copy_ref(d, 2)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["federation"]["rounds"] = 3
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return run


@case("resume", "rounds raised with --allow-config-change federation.rounds")
def _allowed(d: Path) -> tuple[str, str]:
    _more_rounds(d)
    p = cli(d, "run", "--resume", str(RUN), "--allow-config-change", "federation.rounds")
    kind, detail = check_run(d, p, rounds=3)
    if kind == WORKED:
        same = (d / RUN / "adapter/adapter_model.safetensors").read_bytes() == \
            (ref(3) / "adapter/adapter_model.safetensors").read_bytes()
        detail += "; bit-equal to a 3-round run" if same else "; differs from a 3-round run"
    return kind, detail


@case("resume", "rounds raised without --allow-config-change")
def _not_allowed(d: Path) -> tuple[str, str]:
    _more_rounds(d)
    return expect_error(cli(d, "run", "--resume", str(RUN)), "federation\\.rounds|rounds")


@case("resume", "changed data file on resume")
def _changed_data(d: Path) -> tuple[str, str]:
    p = cli(d, "run", write_job(d, _data()(d)))
    if p.rc != 0:
        return expect_error(p, "x")
    make_partial(d / RUN, 1)
    write_jsonl(d / "train.jsonl", ROWS[:-1] + [{"question": "Changed?", "answer": "Yes it changed."}])
    return expect_error(cli(d, "run", "--resume", str(RUN)), "data|train\\.jsonl")


@case("resume", "resume a folder that is not a run", quick=True)
def _not_run(d: Path) -> tuple[str, str]:
    (d / "somewhere").mkdir()
    return expect_error(cli(d, "run", "--resume", "somewhere"), "somewhere")


@case("resume", "resume a folder that does not exist")
def _no_folder(d: Path) -> tuple[str, str]:
    return expect_error(cli(d, "run", "--resume", "nowhere/r9"), "nowhere")


@case("resume", "run folder without config.yaml")
def _no_config(d: Path) -> tuple[str, str]:
    run = partial(d)
    (run / "config.yaml").unlink()
    return expect_error(cli(d, "run", "--resume", str(RUN)), "config\\.yaml")


@case("resume", "resume a finished run")
def _finished(d: Path) -> tuple[str, str]:
    run = copy_ref(d, 2)
    before = (run / "adapter/adapter_model.safetensors").read_bytes()
    p = cli(d, "run", "--resume", str(RUN))
    if p.rc != 0:
        return expect_error(p, "r1")
    kind, detail = check_run(d, p)
    if kind == WORKED and (run / "adapter/adapter_model.safetensors").read_bytes() != before:
        return LOST, "the finished run's adapter was rewritten with other values"
    return kind, detail


@case("resume", "run again with the run_id of a finished run")
def _rerun(d: Path) -> tuple[str, str]:
    run = copy_ref(d, 2)
    before = {f: (run / f).read_bytes() for f in ("adapter/adapter_model.safetensors", "metrics.jsonl")}
    verdict = expect_error(cli(d, "run", write_job(d, job())), "r1", "resume")
    if any((run / f).read_bytes() != b for f, b in before.items()):
        return LOST, f"{verdict[0]}: {verdict[1]}; and the earlier run's outputs changed"
    return verdict


@case("resume", "killed between a round's metrics and its checkpoint")
def _metrics_ahead(d: Path) -> tuple[str, str]:
    run = partial(d, keep=1)
    round2 = next(ln for ln in (ref(3) / "metrics.jsonl").read_text().splitlines() if json.loads(ln)["round"] == 2)
    with (run / "metrics.jsonl").open("a") as f:
        f.write(round2 + "\n")
    return check_run(d, cli(d, "run", "--resume", str(RUN)), rounds=3, ref=ref(3))


@case("resume", "a half-written checkpoint folder left by a kill")
def _leftover(d: Path) -> tuple[str, str]:
    run = partial(d)
    junk = run / "checkpoints" / ".round-0003.x1y2"
    junk.mkdir()
    (junk / "global_state.safetensors").write_bytes(b"half")
    kind, detail = check_run(d, cli(d, "run", "--resume", str(RUN)), rounds=3, ref=ref(3))
    if kind == WORKED and junk.exists():
        return SILENT, f"{detail}; but {junk.name} was left behind"
    return kind, detail


@case("resume", "--allow-config-change with an unknown key")
def _allow_unknown(d: Path) -> tuple[str, str]:
    partial(d)
    p = cli(d, "run", "--resume", str(RUN), "--allow-config-change", "federation.roundz")
    if p.rc != 0:
        return expect_error(p, "federation\\.roundz")
    kind, detail = check_run(d, p, rounds=3, ref=ref(3))
    return kind, f"{detail}; the unknown key was accepted without a warning"


# --- other commands -----------------------------------------------------------------------

@case("commands", "run with a config file that does not exist")
def _no_cfg(d: Path) -> tuple[str, str]:
    return expect_error(cli(d, "run", "gone.yaml"), "gone\\.yaml")


@case("commands", "validate a config file that does not exist")
def _no_cfg_validate(d: Path) -> tuple[str, str]:
    return expect_error(cli(d, "validate", "gone.yaml"), "gone\\.yaml")


@case("commands", "generate with a missing adapter folder")
def _gen_missing(d: Path) -> tuple[str, str]:
    return expect_error(cli(d, "generate", "--adapter", "nowhere/adapter", "What is it?"), "nowhere")


@case("commands", "data split of a missing file")
def _split_missing(d: Path) -> tuple[str, str]:
    return expect_error(cli(d, "data", "split", "gone.jsonl", "--out", "out"), "gone\\.jsonl")


@case("commands", "data split with --test-ratio 1.5")
def _split_ratio(d: Path) -> tuple[str, str]:
    write_jsonl(d / "in.jsonl")
    return expect_error(cli(d, "data", "split", "in.jsonl", "--test-ratio", "1.5", "--out", "out"), "test.ratio")


# --- concurrency --------------------------------------------------------------------------

@case("concurrency", "two runs with the same run_id at once")
def _two_runs(d: Path) -> tuple[str, str]:
    write_job(d, job())
    procs = [start(d, "run", "job.yaml"), start(d, "run", "job.yaml")]
    res = [finish(p) for p in procs]
    ok = [r for r in res if r.rc == 0]
    bad = [r for r in res if r.rc != 0]
    if len(ok) != 1:
        return (SILENT if len(ok) == 2 else UNCLEAR), f"exits {[r.rc for r in res]}: {first_error_line(res[0].out)}"
    kind, detail = expect_error(bad[0], "r1", "in use|already")
    if kind != CLEAR:
        return kind, detail
    kind2, detail2 = check_run(d, ok[0])
    return (CLEAR, f"{detail}; the other: {detail2}") if kind2 == WORKED else (LOST, f"{detail}; other run: {detail2}")


@case("concurrency", "two --resume of one folder at once")
def _two_resumes(d: Path) -> tuple[str, str]:
    partial(d, keep=1)
    procs = [start(d, "run", "--resume", str(RUN)), start(d, "run", "--resume", str(RUN))]
    res = [finish(p) for p in procs]
    ok = [r for r in res if r.rc == 0]
    if len(ok) != 1:
        return (SILENT if len(ok) == 2 else UNCLEAR), f"exits {[r.rc for r in res]}: {first_error_line(res[0].out)}"
    kind, detail = expect_error(next(r for r in res if r.rc != 0), "r1", "in use")
    if kind != CLEAR:
        return kind, detail
    kind2, detail2 = check_run(d, ok[0], rounds=3, ref=ref(3))
    return (CLEAR, f"{detail}; the other: {detail2}") if kind2 == WORKED else (LOST, f"{detail}; other run: {detail2}")


# ------------------------------------------------------------------------------------------
# Runner


def run_case(c: Case, root: Path) -> dict[str, Any]:
    d = Path(tempfile.mkdtemp(prefix=re.sub(r"\W+", "_", c.name)[:40] + "-", dir=root))
    t0 = time.perf_counter()
    try:
        category, detail = c.fn(d)
    except Exception as e:  # noqa: BLE001 - a bug of the suite itself, reported as such
        category, detail = UNCLEAR, f"the suite's check failed: {type(e).__name__}: {e}"
    seconds = time.perf_counter() - t0
    print(f"[{c.group}] {c.name}: {category} ({seconds:.1f} s) {detail[:160]}", flush=True)
    return {"group": c.group, "case": c.name, "category": category, "detail": detail, "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__)
    groups = sorted({c.group for c in CASES})
    p.add_argument("--only", nargs="+", choices=groups, help="run only these groups")
    p.add_argument("--quick", action="store_true", help="about 6 fast cases")
    p.add_argument("--jobs", type=int, default=1, help="cases run at once")
    args = p.parse_args(argv)
    rec = Recorder("faults", argv)
    cases = [c for c in CASES if (not args.quick or c.quick) and (not args.only or c.group in args.only)]
    with tempfile.TemporaryDirectory(prefix="fedpeft-faults-") as tmp:
        _REF_ROOT[:] = [Path(tmp)]
        _REFS.clear()
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            rows = list(pool.map(lambda c: run_case(c, Path(tmp)), cases))
    counts = Counter(r["category"] for r in rows)
    cols = [Column("group", "group"), Column("case", "case"), Column("category", "category"),
            Column("detail", "detail", lambda s: s.replace("|", "\\|")[:200]), Column("seconds", "s", "{:.1f}")]
    table = markdown_table(cols, rows)
    count_line = ", ".join(f"{k}: {counts.get(k, 0)}" for k in CATEGORIES)
    met = counts[SILENT] == 0 and counts[LOST] == 0 and counts[TRACEBACK] == 0 and counts[UNCLEAR] <= 2
    rec.finish(args.results_dir, title="Fault suite", params={"cases": len(rows), "quick": args.quick,
                                                              "only": args.only, "jobs": args.jobs},
               rows=rows, markdown=f"{len(rows)} cases: {count_line}.\n\n{table}",
               goal={"text": GOAL_TEXT, "met": met, "counts": dict(counts)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
