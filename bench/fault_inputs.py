"""Fault-suite cases about what a user gives: bad data, bad configs, other commands (see ``bench/faults.py``)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from bench.fault_kit import (  # noqa: E402
    data_job, plugin_job,
    SILENT, WORKED,
    ROWS,
    RUN,
    case,
    check_run,
    cli,
    error_case,
    expect_error,
    job,
    write_job,
    write_jsonl,
)


# --- bad data ---------------------------------------------------------------------------

error_case("data", "missing data file", lambda d: job(**{"data.train": str(d / "nope.jsonl")}), "nope\\.jsonl",
           quick=True)
error_case("data", "empty data file", data_job(raw=""), "train\\.jsonl")
error_case("data", "invalid JSON on line 3", data_job(raw="".join(json.dumps(r) + "\n" for r in ROWS[:2]) + "{oops\n"
                                                   + "".join(json.dumps(r) + "\n" for r in ROWS[2:])),
           "train\\.jsonl", "\\b3\\b")
error_case("data", "a row without answer", data_job(rows=ROWS[:4] + [{"question": "Q?"}] + ROWS[4:]), "train\\.jsonl",
           "answer")
error_case("data", "unknown field names", data_job(rows=[{"prompt": r["question"], "completion": r["answer"]}
                                                      for r in ROWS]), "train\\.jsonl", "question|field")
error_case("data", "binary file", lambda d: job(**{"data.train": str(d / "train.jsonl")})
           if (d / "train.jsonl").write_bytes(bytes(range(256)) * 40) else {}, "train\\.jsonl")
error_case("data", "question_field names a missing field", data_job(**{"data.question_field": "prompt"}), "prompt")
error_case("data", "answer is a number, not text", data_job(rows=ROWS[:5] + [{"question": "Q?", "answer": 42}] + ROWS[5:]),
           "train\\.jsonl", "answer")
error_case("data", "missing test file", data_job(**{"data.test": "/nonexistent/test.jsonl"}), "test\\.jsonl")
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
    return check_run(d, cli(d, "run", write_job(d, data_job(raw=raw)(d))))


@case("data", "duplicated rows with test_ratio: no question on both sides")
def _dups(d: Path) -> tuple[str, str]:
    rows = [r for r in ROWS for _ in range(2)]
    cfg = data_job(rows=rows, **{"data.test_ratio": 0.25, "data.max_test_samples": None, "eval.max_samples": 40})(d)
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
    cfg = data_job(rows=ROWS[:3], **{"federation.num_clients": 3, "data.test_ratio": 0.34})(d)
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


error_case("config", "plugin file that raises on import",
           lambda d: plugin_job(d, "raise RuntimeError('plugin broken on import')\n"), "my_agg\\.py")
error_case("config", "plugin class whose __init__ raises", lambda d: plugin_job(
    d, "class MyAgg:\n    def __init__(self):\n        raise ValueError('bad init')\n"), "MyAgg|my_agg")
error_case("config", "plugin file that does not exist",
           lambda d: job(**{"federation.aggregation": {"name": f"{d / 'gone.py'}:MyAgg"}}), "gone\\.py")
error_case("config", "plugin class missing from its file", lambda d: plugin_job(d, "class Other:\n    pass\n"),
           "MyAgg")

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


# --- more inputs: odd values, privacy and audit settings, other commands -------------------

for _name, _over, _needles in [
    ("run_id that climbs out of the workspace ('../../escape')", {"run_id": "../../escape"}, ("run_id",)),
    ("LoRA's r given to P-Tuning", {"peft": {"method": "ptuning", "r": 2}}, ("\\br\\b",)),
    ("fedadam with server_lr: -1", {"federation.aggregation": {"name": "fedadam", "server_lr": -1}}, ("server_lr",)),
    ("max_update_norm: -1", {"federation.max_update_norm": -1}, ("max_update_norm",)),
    ("privacy level client without noise or target", {"privacy": {"level": "client"}}, ("noise_multiplier",)),
    ("privacy noise_multiplier: 0", {"privacy": {"level": "example", "noise_multiplier": 0}}, ("noise_multiplier",)),
    ("privacy delta: 2", {"privacy": {"level": "client", "noise_multiplier": 1, "delta": 2}}, ("delta",)),
    ("audit.client beyond num_clients", {"audit": {"canaries": 2, "client": 5}}, ("audit\\.client",)),
]:
    error_case("config", _name, lambda d, o=_over: job(**o), *_needles)

error_case("config", "override federation.rounds=abc", lambda d: job(), "rounds", args=("federation.rounds=abc",))


@case("config", "workspace is a file")
def _workspace_file(d: Path) -> tuple[str, str]:
    (d / "ws").write_text("not a folder")
    return expect_error(cli(d, "run", write_job(d, job())), "ws")


@case("config", "seed: -1")
def _negative_seed(d: Path) -> tuple[str, str]:
    p = cli(d, "run", write_job(d, job(seed=-1)))
    return check_run(d, p) if p.rc == 0 else expect_error(p, "seed")


@case("data", "a question longer than max_seq_len")
def _long_question(d: Path) -> tuple[str, str]:
    rows = [{"question": "Why? " * 400, "answer": r["answer"]} if i == 3 else r for i, r in enumerate(ROWS)]
    return check_run(d, cli(d, "run", write_job(d, data_job(rows=rows)(d))))


@case("data", "invalid UTF-8 on line 2")
def _bad_utf8(d: Path) -> tuple[str, str]:
    (d / "train.jsonl").write_bytes(json.dumps(ROWS[0]).encode() + b"\n{\"question\": \"\xff\xfe\", \"answer\": \"a\"}\n"
                                    + "".join(json.dumps(r) + "\n" for r in ROWS[1:]).encode())
    return expect_error(cli(d, "run", write_job(d, job(**{"data.train": str(d / "train.jsonl")}))),
                        "train\\.jsonl", "\\b2\\b|utf")


@case("data", "an empty answer")
def _empty_answer(d: Path) -> tuple[str, str]:
    rows = ROWS[:5] + [{"question": "Q?", "answer": ""}] + ROWS[5:]
    p = cli(d, "run", write_job(d, data_job(rows=rows)(d)))
    return check_run(d, p) if p.rc == 0 else expect_error(p, "train\\.jsonl", "\\b6\\b")


@case("commands", "leaderboard of a folder without results")
def _leaderboard_empty(d: Path) -> tuple[str, str]:
    (d / "empty").mkdir()
    return expect_error(cli(d, "leaderboard", "empty"), "empty")


@case("commands", "generate with an empty adapter folder")
def _gen_empty(d: Path) -> tuple[str, str]:
    (d / "adapter").mkdir()
    return expect_error(cli(d, "generate", "--adapter", "adapter", "What is it?"), "adapter")
