"""End to end through the CLI on the tiny model: every output of a run, resume, validate errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file

from fedpeft.cli import main
from fedpeft.generation import generate_answers
from fedpeft.io_utils import read_jsonl

TINY_JOB = {
    "job": "e2e",
    "seed": 3,
    "model": {"name": "tiny-random-llama"},
    "peft": {"method": "lora", "r": 4},
    "data": {"train": "builtin:sample", "test_ratio": 0.1, "split_by": "focus", "max_seq_len": 96,
             "max_test_samples": 4},
    "federation": {"num_clients": 3, "rounds": 2, "partition": {"method": "iid"},
                   "aggregation": {"name": "fedavgm", "beta": 0.5}},
    "train": {"learning_rate": 5e-3, "batch_size": 8, "max_steps": 2},
    "eval": {"every": 1, "max_new_tokens": 6, "batch_size": 4},
}


def _write(tmp_path: Path, job: dict, name: str = "job.yaml") -> Path:
    job = {**job, "workspace": str(tmp_path / "ws")}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(job))
    return path


def _run_dir(tmp_path: Path, job: str = "e2e") -> Path:
    (run,) = (tmp_path / "ws" / job).iterdir()
    return run


def test_run_writes_every_output(tmp_path, tiny_base):
    cfg = _write(tmp_path, TINY_JOB)
    assert main(["run", str(cfg)]) == 0
    run = _run_dir(tmp_path)
    assert yaml.safe_load((run / "config.yaml").read_text())["federation"]["aggregation"]["beta"] == 0.5
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in records] == [0, 1, 2] and records[0]["zero_shot"]
    for r in records[1:]:
        assert len(r["clients"]) == 3 and r["bytes_down"] == r["bytes_up"] > 0
        assert {"train_loss", "num_examples", "seconds", "device", "client_id"} <= set(r["clients"][0])
        assert {"rouge1", "rouge2", "rougeL", "bleu4", "heldout_loss"} <= set(r["eval"])
        assert 0 <= r["eval"]["rougeL"] <= 1 and r["eval"]["heldout_loss"] > 0
    preds = read_jsonl(run / "predictions.jsonl")
    assert len(preds) == 4 and {"question", "reference", "prediction"} <= set(preds[0])
    parts = json.loads((run / "partitions.json").read_text())
    assert len(parts) == 3 and all(p["size"] > 0 for p in parts)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trainable_parameters"] > 0 and summary["update_bytes"] == 4 * summary["trainable_parameters"]
    # the final adapter loads with plain PEFT and equals the last checkpoint's global state
    loaded = PeftModel.from_pretrained(tiny_base[0].__class__(tiny_base[0].config), run / "adapter")
    ckpt = load_file(str(run / "checkpoints" / "round-0002" / "global_state.safetensors"))
    lora = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert len(lora) == len(ckpt)
    for name, tensor in ckpt.items():
        assert torch.equal(lora[name.replace(".default.", ".default.")], tensor)
    assert (run / "checkpoints" / "latest").read_text().strip() == "round-0002"


def test_resume_matches_uninterrupted_run(tmp_path):
    job = {**TINY_JOB, "eval": {**TINY_JOB["eval"], "every": 0, "zero_shot": False}}
    job["federation"] = {**job["federation"], "rounds": 3}
    full = _write(tmp_path, {**job, "run_id": "full"})
    assert main(["run", str(full)]) == 0
    part = _write(tmp_path, {**job, "run_id": "part"}, "part.yaml")
    assert main(["run", str(part), "federation.rounds=3"]) == 0
    part_dir = tmp_path / "ws" / "e2e" / "part"
    # simulate a crash after round 1: drop later checkpoints and rewind 'latest'
    (part_dir / "checkpoints" / "latest").write_text("round-0001\n")
    for r in (2, 3):
        import shutil

        shutil.rmtree(part_dir / "checkpoints" / f"round-000{r}")
    assert main(["run", "--resume", str(part_dir)]) == 0
    a = load_file(str(tmp_path / "ws" / "e2e" / "full" / "checkpoints" / "round-0003" / "global_state.safetensors"))
    b = load_file(str(part_dir / "checkpoints" / "round-0003" / "global_state.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    rounds = [r["round"] for r in read_jsonl(part_dir / "metrics.jsonl")]
    assert rounds == [1, 2, 3]  # no duplicated records


def test_validate_lists_every_problem(tmp_path, capsys):
    bad = {**TINY_JOB, "peft": {"method": "lora", "alpah": 4},
           "federation": {**TINY_JOB["federation"], "aggregation": {"name": "fedavgx"}},
           "train": {"learning_rate": -1, "batchsize": 2}}
    path = _write(tmp_path, bad)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"4 problems in {path}:" in err
    assert sum(line.startswith("  - ") for line in err.splitlines()) == 4  # one line per problem
    for needle in ("peft.alpah", "did you mean 'alpha'", "fedavgx", "fedavgm", "train.learning_rate",
                   "train.batchsize", "did you mean 'batch_size'", str(path) + ":"):
        assert needle in err, needle
    assert main(["validate", str(_write(tmp_path, TINY_JOB, "ok.yaml"))]) == 0


def test_generate_answers_with_the_trained_adapter(tmp_path, capsys, tiny_base):
    cfg = _write(tmp_path, {**TINY_JOB, "federation": {**TINY_JOB["federation"], "rounds": 1},
                            "eval": {**TINY_JOB["eval"], "zero_shot": False}})
    assert main(["run", str(cfg)]) == 0
    adapter = _run_dir(tmp_path) / "adapter"
    questions = ["What is asthma?", "What causes gout?", "How is the flu treated?"]
    capsys.readouterr()
    assert main(["generate", "--adapter", str(adapter), "--max-new-tokens", "5", *questions]) == 0
    out = capsys.readouterr().out
    # the same answers as the adapter loaded with plain PEFT, and not the base model's
    base, tok = copy.deepcopy(tiny_base[0]), tiny_base[1]
    kwargs = dict(max_new_tokens=5, repetition_penalty=1.1, progress=False)  # the CLI's defaults
    without = generate_answers(base, tok, questions, **kwargs)
    with_adapter = generate_answers(PeftModel.from_pretrained(base, adapter), tok, questions, **kwargs)
    assert with_adapter != without  # premise: this adapter changes the tiny model's answers
    assert out == "".join(f"Q: {q}\nA: {a}\n\n" for q, a in zip(questions, with_adapter))
