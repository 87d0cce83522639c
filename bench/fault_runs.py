"""Fault-suite cases about runs: faulty aggregation, kills, damaged checkpoints, resume, concurrency."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from bench.fault_kit import (  # noqa: E402
    data_job, plugin_job,
    CLEAR, LOST, SILENT, UNCLEAR, WORKED,
    CASES,
    Case,
    ROWS,
    RUN,
    TIMEOUT_S,
    case,
    check_run,
    cli,
    copy_ref,
    damage,
    expect_error,
    finish,
    first_error_line,
    job,
    latest_state,
    make_partial,
    partial,
    ref,
    start,
    state_finite,
    write_job,
    write_jsonl,
)


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
        p = cli(d, "run", write_job(d, plugin_job(d, _AGG.format(bad_from=bad_from, body=body))))
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


@case("clients", "learning rate 1e30: a NaN training loss")
def _nan_loss(d: Path) -> tuple[str, str]:
    return expect_error(cli(d, "run", write_job(d, job(**{"train.learning_rate": 1e30, "federation.rounds": 3}))),
                        "client-\\d", "loss")


@case("resume", "Ctrl-C when round 1's checkpoint appears, then --resume")
def _ctrl_c(d: Path) -> tuple[str, str]:
    reference = ref(6)  # 6 rounds: on a loaded machine a 3-round run may end before the signal lands
    p = start(d, "run", write_job(d, job(**{"federation.rounds": 6})))
    target, deadline = d / RUN / "checkpoints" / "round-0001", time.monotonic() + TIMEOUT_S
    while not target.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if p.poll() is not None:
        return UNCLEAR, f"the run ended (exit {p.returncode}) before Ctrl-C"
    os.kill(p.pid, signal.SIGINT)
    stopped = finish(p, 60)
    if "Traceback (most recent call last)" in stopped.out or stopped.rc != 130 or "--resume" not in stopped.out:
        return UNCLEAR, f"Ctrl-C: exit {stopped.rc}, {first_error_line(stopped.out)}"
    kind, detail = check_run(d, cli(d, "run", "--resume", str(RUN)), rounds=6, ref=reference)
    return kind, f"Ctrl-C said: {first_error_line(stopped.out)[:80]}; {detail}"


@case("resume", "metrics.jsonl cut mid-line (a kill while writing), then --resume")
def _cut_metrics(d: Path) -> tuple[str, str]:
    run = partial(d, rounds=3, keep=2)
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text + text.splitlines()[-1][:25])
    kind, detail = check_run(d, cli(d, "run", "--resume", str(RUN)), rounds=3, ref=ref(3))
    return kind, detail
_kill_case("kill -9 when round 2's checkpoint appears, then --resume", 2)


def _kill_before_first_checkpoint(d: Path) -> None:
    """Start the job and SIGKILL it as soon as its run folder exists."""
    p = start(d, "run", write_job(d, job()))
    deadline = time.monotonic() + TIMEOUT_S
    while not (d / RUN / "config.yaml").exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    finish(p, 30)


@case("resume", "kill -9 before the first checkpoint, then --resume")
def _kill_early(d: Path) -> tuple[str, str]:
    _kill_before_first_checkpoint(d)
    if (d / RUN / "checkpoints" / "latest").exists():
        return UNCLEAR, "the first checkpoint was already written when the kill landed"
    p = cli(d, "run", "--resume", str(RUN))
    if p.rc != 0:
        return expect_error(p, "checkpoint")
    kind, detail = check_run(d, p, ref=ref(2))
    return kind, f"no checkpoint: started over; {detail}"


@case("resume", "kill -9 before the first checkpoint, then run again")
def _kill_early_rerun(d: Path) -> tuple[str, str]:
    _kill_before_first_checkpoint(d)
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
    p = cli(d, "run", write_job(d, data_job()(d)))
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
