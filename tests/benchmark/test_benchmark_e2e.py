"""End to end through the CLI: a two-value grid (peft_method: lora, ptuning) in the Ianvs format
on the tiny model, with every baseline; then the leaderboard command, a re-run and the report."""

from __future__ import annotations

import csv
import json
import re
import uuid
from pathlib import Path

import pytest
import yaml
from benchmark_jobs import tiny_ianvs_files, write_files

from fedpeft.benchmark.screenshot import find_chromium, screenshot
from fedpeft.cli import main


def _rank(job_dir: Path, name: str = "all_rank") -> tuple[list[str], list[dict]]:
    with open(job_dir / "rank" / f"{name}.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """Run the tiny job once for the module; return its job folder."""
    root = tmp_path_factory.mktemp("bench")
    path = write_files(root, tiny_ianvs_files(root))
    assert main(["benchmark", str(path)]) == 0
    return root / "ws" / "tiny-bench"


def test_every_test_case_and_baseline_runs_in_its_own_folder(job):
    folders = {p.name: sorted(q.name for q in p.iterdir()) for p in job.iterdir() if p.is_dir() and p.name != "rank"}
    assert {k: len(v) for k, v in folders.items()} == {
        "fedavgm-peft": 2, "zero_shot": 1, "local_only": 4, "centralized": 2}  # local: 2 clients x 2 methods
    for names in folders.values():
        for name in names:
            uuid.UUID(name)  # workspace/<job>/<algorithm>/<uuid>
    for case in (job / "fedavgm-peft").iterdir():
        for f in ("config.yaml", "metrics.jsonl", "summary.json", "partitions.json", "predictions.jsonl",
                  "testcase.json", "adapter"):
            assert (case / f).exists(), f
    methods = sorted(json.loads((c / "testcase.json").read_text())["hyperparameters"]["basemodel-peft_method"]
                     for c in (job / "fedavgm-peft").iterdir())
    assert methods == ["lora", "ptuning"]


def test_rank_csv_rows_columns_and_sort_order(job):
    columns, rows = _rank(job)
    assert columns == [
        "rank", "algorithm", "rouge1_metric", "rougel_metric", "paradigm", "basemodel", "aggregation",
        "basemodel-batch_size", "basemodel-learning_rate", "basemodel-model_name", "basemodel-save_dir",
        "basemodel-peft_method", "aggregation-beta", "aggregation-server_lr", "rounds", "clients",
        "trainable_parameters", "bytes_per_update", "bytes_per_round", "wall_seconds", "peak_memory_mb", "heldout_loss",
        "pct_of_centralized", "vs_zero_shot", "vs_centralized", "loss_vs_zero_shot", "loss_vs_centralized", "time", "url"]
    assert len(rows) == 2 + 1 + 4 + 2 + 2 * 2  # cases, zero-shot, local per client, centralised, mean+worst x2
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    keys = [(float(r["heldout_loss"]), -float(r["rougel_metric"])) for r in rows]
    assert keys == sorted(keys)  # sort_by: heldout_loss ascend, then rougel_metric descend
    assert len({k[0] for k in keys}) > 3  # the order is decided by real differences
    fed = [r for r in rows if r["paradigm"] == "federatedlearning"]
    assert sorted(r["basemodel-peft_method"] for r in fed) == ["lora", "ptuning"]
    for r in fed:
        assert r["aggregation"] == "FedAvgM-PEFT" and r["aggregation-beta"] == "0.5"
        assert r["rounds"] == "2" and r["clients"] == "2" and int(r["trainable_parameters"]) > 0
        assert int(r["bytes_per_round"]) == 2 * 2 * 4 * int(r["trainable_parameters"])  # 2 clients, down + up
        assert int(r["bytes_per_update"]) == 4 * int(r["trainable_parameters"])  # one fp32 update
        assert float(r["wall_seconds"]) > 0 and float(r["peak_memory_mb"]) > 0
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", r["time"]) and Path(r["url"]).is_dir()
        for col in ("vs_zero_shot", "vs_centralized"):  # first metric's difference [paired bootstrap 95 % CI]
            assert re.fullmatch(r"[+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]", r[col]), r[col]
    _, selected = _rank(job, "selected_rank")
    assert len(selected) == len(rows)


def test_baseline_rows(job):
    _, rows = _rank(job)
    by_algo: dict[str, list[dict]] = {}
    for r in rows:
        by_algo.setdefault(r["algorithm"], []).append(r)
    assert set(by_algo) == {"fedavgm-peft", "zero_shot", "local_only client-0", "local_only client-1",
                            "local_only (mean)", "local_only (worst)", "centralized"}
    (zero,) = by_algo["zero_shot"]
    assert zero["paradigm"] == "baseline" and zero["rounds"] == "0" and zero["trainable_parameters"] == "0"
    assert zero["basemodel-peft_method"] == "" and zero["basemodel-model_name"] == "tiny-random-llama"
    for name in ("centralized", "local_only client-0", "local_only (mean)", "local_only (worst)"):
        assert sorted(r["basemodel-peft_method"] for r in by_algo[name]) == ["lora", "ptuning"], name
        for r in by_algo[name]:
            assert r["paradigm"] == "baseline" and r["aggregation"] == "" and r["aggregation-beta"] == ""
            assert r["bytes_per_round"] == "0" and r["clients"] == "1"
    for r in by_algo["centralized"]:
        assert r["pct_of_centralized"] == "100"
    for r in by_algo["fedavgm-peft"]:  # held-out loss: centralised / federated, in percent
        central = next(c for c in by_algo["centralized"] if c["basemodel-peft_method"] == r["basemodel-peft_method"])
        expected = 100 * float(central["heldout_loss"]) / float(r["heldout_loss"])
        assert float(r["pct_of_centralized"]) == pytest.approx(expected, abs=0.051)
    for method in ("lora", "ptuning"):
        local = [float(r["heldout_loss"]) for r in rows
                 if r["algorithm"].startswith("local_only client") and r["basemodel-peft_method"] == method]
        worst = next(r for r in by_algo["local_only (worst)"] if r["basemodel-peft_method"] == method)
        mean = next(r for r in by_algo["local_only (mean)"] if r["basemodel-peft_method"] == method)
        assert float(worst["heldout_loss"]) == pytest.approx(max(local), rel=1e-5)
        assert float(mean["heldout_loss"]) == pytest.approx(sum(local) / 2, rel=1e-5)
    # the centralised run took as many optimizer steps as the federated one (2 rounds x 2 clients x 1)
    central = next(p for p in (job / "centralized").iterdir())
    steps = [c["steps"] for r in map(json.loads, (central / "metrics.jsonl").read_text().splitlines())
             if r.get("event") == "round" for c in r["clients"]]
    assert sum(steps) == 4


def test_report_is_written_and_holds_every_section(job):
    text = (job / "report.html").read_text()
    for needle in ("Leaderboard", "Final metrics", "Metrics per round", "Train loss per client",
                   "Data partition sizes per client", "centralized", "local_only (mean)", "fedavgm-peft"):
        assert needle in text, needle
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 4 and all(len(i) > 2000 for i in images)
    assert "http://" not in text and "https://" not in text  # readable offline


def test_leaderboard_command_and_rerun_adds_rows_without_duplicates(job, capsys):
    capsys.readouterr()
    assert main(["leaderboard", str(job.parent), "--sort-by", "heldout_loss"]) == 0
    out = capsys.readouterr().out
    assert "tiny-bench: leaderboard" in out and "centralized" in out
    _, before = _rank(job)
    bench = job.parent.parent / "benchmarkingjob.yaml"
    assert main(["run", str(bench), "fedpeft_unused=1"]) == 2  # an override must name a job key
    capsys.readouterr()
    # `fedpeft run` detects the Ianvs format; a smaller grid re-run adds only its own rows
    files = tiny_ianvs_files(job.parent.parent, workspace=job.parent)
    files["benchmarkingjob.yaml"]["benchmarkingjob"]["fedpeft"]["baselines"] = ["zero_shot"]
    files["algorithm/algorithm.yaml"]["algorithm"]["modules"][0]["hyperparameters"][-1] = {"peft_method": {"values": ["lora"]}}
    write_files(job.parent.parent / "rerun", files)
    assert main(["run", str(job.parent.parent / "rerun" / "benchmarkingjob.yaml")]) == 0
    _, after = _rank(job)
    assert len(after) == len(before) + 2
    assert {r["url"] for r in before} < {r["url"] for r in after}


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium to render the report (apt-get install chromium)")
def test_report_renders_in_headless_chromium(job, tmp_path):
    png = screenshot(job / "report.html", tmp_path / "report.png", width=1200, height=2400)
    from PIL import Image

    img = Image.open(png).convert("L")
    assert img.size == (1200, 2400)
    colors = img.getcolors(maxcolors=1 << 16) or []
    assert len(colors) > 50  # text, tables and plots, not a blank page


def test_an_ianvs_job_with_prefix_tuning_runs_and_its_saved_adapter_answers_alike(tmp_path):
    # `peft_method: prefix` is P-Tuning v2 (what the Ianvs example trains as `ptuning` on ChatGLM).
    from fedpeft.adapters import load_adapter
    from fedpeft.generation import generate_answers

    files = tiny_ianvs_files(tmp_path)
    bench = files["benchmarkingjob.yaml"]["benchmarkingjob"]
    bench["fedpeft"]["baselines"] = []
    bench["fedpeft"]["peft"] = {"prefix": {"num_virtual_tokens": 3, "encoder_hidden_size": 8}}
    bench["fedpeft"]["config"]["eval"]["every"] = 0
    files["algorithm/algorithm.yaml"]["algorithm"]["modules"][0]["hyperparameters"][-1] = {
        "peft_method": {"values": ["prefix"]}}
    assert main(["benchmark", str(write_files(tmp_path, files))]) == 0
    (case,) = (tmp_path / "ws" / "tiny-bench" / "fedavgm-peft").iterdir()
    summary = json.loads((case / "summary.json").read_text())
    assert summary["final"]["heldout_loss"] > 0 and summary["trainable_parameters"] > 0
    rows = [json.loads(line) for line in (case / "predictions.jsonl").read_text().splitlines()]
    model, tokenizer = load_adapter(case / "adapter")  # inference mode: the MLP's output is saved
    assert model.active_peft_config.peft_type.value == "PREFIX_TUNING"
    penalty = yaml.safe_load((case / "config.yaml").read_text())["eval"]["repetition_penalty"]  # as the run
    again = generate_answers(model, tokenizer, [r["question"] for r in rows], max_new_tokens=3,
                             repetition_penalty=penalty, progress=False)
    assert again == [r["prediction"] for r in rows]
