"""Fault-suite cases of a Flower deployment on 127.0.0.1: hostile or dying sites, bad site and server input.

Every case that runs a deployment starts ``fedpeft server`` and ``fedpeft client`` processes through
:class:`fedpeft.deploy.loopback.Loopback` (3 sites, tiny model, 2 rounds, ``min_clients: 2``). A
hostile site is a real ``fedpeft client`` whose trainer is patched by a small wrapper script to
send NaN, a wrong shape, a missing tensor or a huge update, or to hang.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from bench.fault_kit import (  # noqa: E402
    CLEAR, SILENT, UNCLEAR, WORKED, ROWS, Proc, case, cli, expect_error, first_error_line, state_finite, write_jsonl,
)
from fedpeft.deploy.loopback import Loopback  # noqa: E402

SITES = ("site-a", "site-b", "site-c")
ROUND_TIMEOUT_S = 30
DEPLOY = {"round_timeout_s": ROUND_TIMEOUT_S, "wait_for_sites_s": 150, "round_retries": 0}
SERVER_TIMEOUT_S = 240

_HOSTILE = '''
import sys, time
import numpy as np
import fedpeft.deploy.site_training as st

MODE = sys.argv.pop(1)
_train = st.SiteTrainer.train


def train(self, config, state):
    n, metrics, cid, new = _train(self, config, state)
    first = next(iter(new))
    if MODE == "nan":
        new = {k: v * np.nan for k, v in new.items()}
    elif MODE == "shape":
        new[first] = new[first][..., :1]
    elif MODE == "missing":
        new.pop(first)
    elif MODE == "huge":
        new = {k: state[k] + (v - state[k]) * 1e12 for k, v in new.items()}
    elif MODE == "hang":
        time.sleep(3600)
    return n, metrics, cid, new


st.SiteTrainer.train = train
from fedpeft.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _sites(d: Path) -> dict[str, Path]:
    return {name: Path(write_jsonl(d / f"{name}.jsonl", ROWS[8 * i:8 * i + 8])) for i, name in enumerate(SITES)}


def _job(d: Path, **federation) -> dict:
    return {
        "job": "dep", "seed": 1, "model": {"name": "tiny-random-llama"}, "peft": {"method": "lora", "r": 2},
        "data": {"client_files": [str(d / f"{n}.jsonl") for n in SITES], "test": write_jsonl(d / "test.jsonl", ROWS[:2]),
                 "max_seq_len": 64},
        "federation": {"num_clients": 3, "rounds": 2, "min_clients": 2, **federation},
        "train": {"learning_rate": 5e-3, "batch_size": 4, "max_steps": 1},
        "eval": {"every": 0, "zero_shot": False, "max_new_tokens": 2, "max_samples": 2, "metrics": ["rougeL"],
                 "heldout_loss": False},
    }


def _deploy(d: Path, job: dict, hostile: dict[str, str] | None = None, deploy: dict | None = None,
            kill: str | None = None, kill_after_round: int | None = None) -> tuple[Proc, Loopback]:
    """Run a whole loopback deployment; ``hostile`` maps a site to its wrapper mode."""
    (d / "hostile.py").write_text(_HOSTILE)
    sites = _sites(d)
    lb = Loopback(d / "lb", job, sites, env={"OMP_NUM_THREADS": "1"}, deploy={**DEPLOY, **(deploy or {})})
    with lb:
        lb.start_server()
        if not lb.wait_for_log("server", "ready: sites connect to", 90):
            return Proc(124, lb.log("server").read_text(errors="replace")), lb
        for name in SITES:
            mode = (hostile or {}).get(name)
            lb.start_site(name, command=[sys.executable, str(d / "hostile.py"), mode] if mode else None)
        if kill and kill_after_round and lb.wait_for_log("server", f"[round {kill_after_round}/", 150):
            lb.kill_site(kill)  # as the next round starts
        elif kill and lb.wait_for_log(kill, "Receiving: train message", 120, count=2):
            lb.kill_site(kill)  # in round 2, after it has pulled its task
        rc = lb.wait_server(SERVER_TIMEOUT_S)
        out = lb.log("server").read_text(errors="replace")
    return Proc(124 if rc == -1 else rc, out), lb


def _check(p: Proc, lb: Loopback, bad: str | None, reason: str) -> tuple[str, str]:
    """Exit 0, rounds 1..2, finite adapter, and ``bad`` (if any) named as dropped in every round it was in."""
    if "Traceback (most recent call last)" in p.out:
        return "traceback", first_error_line(p.out.split("Traceback (most recent call last)")[-1])
    if p.rc != 0:
        return UNCLEAR, f"exit {p.rc}: {first_error_line(p.out)}"
    adapter = lb.run_dir / "adapter" / "adapter_model.safetensors"
    records = [r for r in lb.metrics() if r.get("event", "round") == "round"]
    if [r["round"] for r in records] != [1, 2] or not adapter.is_file() or not state_finite(adapter):
        return SILENT, f"rounds {[r['round'] for r in records]}, adapter present {adapter.is_file()}"
    dropped = [(r["round"], x["client"], x["reason"]) for r in records for x in r["dropped"]]
    if bad is None:
        return (WORKED, "2 rounds, nobody dropped") if not dropped else (SILENT, f"dropped {dropped}")
    import re

    named = [x for x in dropped if x[1] == bad and re.search(reason, x[2], re.I)]
    others = [x for x in dropped if x[1] != bad]
    if not named or others:
        return SILENT, f"dropped {dropped}; expected {bad} ({reason}) only"
    used = sorted({c["client_id"] for r in records for c in r["clients"]})
    return WORKED, f"{bad} dropped in round(s) {[x[0] for x in named]}: {named[0][2][:90]}; used {used}"


def _hostile_case(name: str, mode: str, reason: str, **federation) -> None:
    @case("deployment", name)
    def fn(d: Path) -> tuple[str, str]:
        p, lb = _deploy(d, _job(d, **federation), {"site-c": mode})
        return _check(p, lb, "site-c", reason)


_hostile_case("a site sends NaN", "nan", "non-finite|nan")
_hostile_case("a site sends a wrong shape", "shape", "shape")
_hostile_case("a site leaves out a tensor", "missing", "missing|key")
_hostile_case("a site sends an update scaled by 1e12 (max_update_norm 10)", "huge", "norm", max_update_norm=10.0)
_hostile_case("a site hangs in training", "hang", "no reply|timeout|within")


@case("deployment", "a plain deployment (reference)")
def _plain(d: Path) -> tuple[str, str]:
    p, lb = _deploy(d, _job(d))
    return _check(p, lb, None, "")


@case("deployment", "a site killed (-9) in round 2")
def _killed(d: Path) -> tuple[str, str]:
    p, lb = _deploy(d, _job(d), kill="site-c")
    return _check(p, lb, "site-c", "no reply|lost|connect|within")


@case("deployment", "two sites of three send NaN (min_clients 2)")
def _too_few(d: Path) -> tuple[str, str]:
    t0 = time.monotonic()
    p, lb = _deploy(d, _job(d), {"site-b": "nan", "site-c": "nan"})
    verdict = expect_error(p, "min_clients|fewer|at least", "site-b|site-c")
    if verdict[0] == CLEAR and (lb.run_dir / "checkpoints" / "round-0001").exists():
        return SILENT, f"{verdict[1]}; but a round-1 checkpoint was written"
    return verdict[0], f"{verdict[1]} ({time.monotonic() - t0:.0f} s)"


@case("deployment", "a job sites refuse (trust_remote_code, no --allow-remote-code)")
def _refused(d: Path) -> tuple[str, str]:
    job = _job(d)
    job["model"]["trust_remote_code"] = True
    p, _ = _deploy(d, job)
    return expect_error(p, "remote.code|refus")


@case("deployment", "fedpeft client with a missing data file")
def _client_no_data(d: Path) -> tuple[str, str]:
    return expect_error(cli(d, "client", "--server", "127.0.0.1:9", "--name", "a", "--data", "nope.jsonl",
                            "--insecure", "--retry-for", "5", timeout=60), "nope\\.jsonl")


@case("deployment", "fedpeft client with invalid JSON in its data")
def _client_bad_json(d: Path) -> tuple[str, str]:
    write_jsonl(d / "bad.jsonl", raw='{"question": "q", "answer": "a"}\n{oops\n')
    return expect_error(cli(d, "client", "--server", "127.0.0.1:9", "--name", "a", "--data", "bad.jsonl",
                            "--insecure", "--retry-for", "5", timeout=60), "bad\\.jsonl:2", "invalid JSON")


@case("deployment", "fedpeft client with no server listening")
def _client_no_server(d: Path) -> tuple[str, str]:
    from fedpeft.deploy.launch import free_port

    write_jsonl(d / "a.jsonl", ROWS[:4])
    t0 = time.monotonic()
    p = cli(d, "client", "--server", f"127.0.0.1:{free_port()}", "--name", "a", "--data", "a.jsonl", "--insecure",
            "--retry-for", "10", "--workspace", str(d / "ws"), timeout=120)
    verdict = expect_error(p, "server|connect|reach")
    return verdict[0], f"{verdict[1]} (gave up after {time.monotonic() - t0:.0f} s)"


def _server_error(d: Path, deploy: dict, *needles: str, job_extra: tuple[str, ...] = ()) -> tuple[str, str]:
    _sites(d)
    (d / "job.yaml").write_text(yaml.safe_dump(_job(d)))
    (d / "deploy.yaml").write_text(yaml.safe_dump({"listen": "127.0.0.1:0", "insecure": True,
                                                   "sites": [{"name": n} for n in SITES], **deploy}))
    return expect_error(cli(d, "server", "job.yaml", "--deploy", "deploy.yaml", *job_extra, timeout=90), *needles)


@case("deployment", "deploy.yaml with an unknown key")
def _deploy_unknown(d: Path) -> tuple[str, str]:
    return _server_error(d, {"round_timeout": 5}, "deploy\\.yaml", "round_timeout")


@case("deployment", "deploy.yaml names a missing certificate")
def _deploy_cert(d: Path) -> tuple[str, str]:
    return _server_error(d, {"insecure": False, "tls": {"ca_cert": "ca.pem", "server_cert": "s.pem",
                                                        "server_key": "s.key"}}, "ca\\.pem|s\\.pem|s\\.key")


@case("deployment", "an override of an unknown key after --deploy")
def _deploy_override(d: Path) -> tuple[str, str]:
    return _server_error(d, {}, "federation\\.roundz", job_extra=("federation.roundz=3",))


# SecAgg+ with 3 sites: a reconstruction threshold of 2 shares tolerates one site dropping out.
SECAGG = {"enabled": True, "clipping_range": 0.5, "max_weight": 8, "reconstruction_threshold": 2}


@case("deployment", "secure aggregation: a site killed (-9) in round 2")
def _secagg_killed(d: Path) -> tuple[str, str]:
    # A site lost before SecAgg+ has shared its keys halts the protocol (every share is needed);
    # the round is retried with the sites still connected, and the SuperLink counts a killed site
    # as connected until its heartbeat expires: an attempt or two may halt again first.
    deploy = {"secure_aggregation": SECAGG, "round_retries": 3, "wait_for_sites_s": 60}
    p, lb = _deploy(d, _job(d), deploy=deploy, kill="site-c", kill_after_round=1)
    return _check(p, lb, "site-c", "no reply|lost|connect|within|drop")


@case("deployment", "secure aggregation: a site sends NaN")
def _secagg_nan(d: Path) -> tuple[str, str]:
    p, lb = _deploy(d, _job(d), {"site-c": "nan"}, deploy={"secure_aggregation": SECAGG})
    return _check(p, lb, "site-c", "non-finite|nan|drop")
