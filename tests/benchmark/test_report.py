"""The HTML report from hand-written test case records (no model runs): sections, figures, and
text from the job escaped, never taken as markup."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedpeft.benchmark.report import write_report

EVIL = '<script>alert("x")</script>'
META = {
    "name": f"job {EVIL}", "source": "job.yaml", "metrics": [{"column": "rougel_metric", "key": "rougeL"}],
    "modules": ["basemodel"], "hyperparameters": ["basemodel-peft_method"],
    "rank": {"sort_by": [{"rougel_metric": "descend"}], "save_mode": "selected_and_all",
             "selected_dataitem": {"paradigms": ["all"], "modules": ["all"], "hyperparameters": ["all"],
                                   "metrics": ["all"]}},
}


def _record(job: Path, kind: str, algorithm: str, rouge: float, *, rounds: bool) -> None:
    run = job / kind / algorithm.replace("<", "").replace(">", "").replace("/", "")
    run.mkdir(parents=True)
    rec = {"kind": kind, "session": "s1", "algorithm": algorithm, "group": "g1", "client": None,
           "paradigm": "federatedlearning" if kind == "federated" else "baseline",
           "modules": {"basemodel": "m"}, "hyperparameters": {"basemodel-peft_method": "lora"},
           "metrics": {"rougel_metric": rouge}, "extra": {"heldout_loss": 2.0 - rouge},
           "time": "2025-01-01 00:00:00", "url": str(run)}
    (run / "testcase.json").write_text(json.dumps(rec))
    events = [{"event": "round", "round": r, "eval": {"rougeL": rouge * r / 2, "heldout_loss": 2.0 - rouge},
               "clients": [{"client_id": f"client-{c}", "train_loss": 3.0 - r - c / 10} for c in range(2)]}
              for r in (1, 2)] if rounds else []
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if kind == "federated":
        (run / "partitions.json").write_text(json.dumps([{"client": c, "size": 4 + c} for c in range(2)]))


@pytest.fixture
def job(tmp_path: Path) -> Path:
    job = tmp_path / "ws" / "job"
    job.mkdir(parents=True)
    (job / "benchmark.json").write_text(json.dumps(META))
    _record(job, "federated", f"fedavg {EVIL}", 0.3, rounds=True)
    _record(job, "centralized", "centralized", 0.4, rounds=True)
    return job


def test_report_holds_every_section_table_and_figure(job):
    text = write_report(job).read_text()
    for needle in ("Leaderboard", "Final metrics", "Metrics per round", "Train loss per client",
                   "Data partition sizes per client", "Every column (rank/all_rank.csv)"):
        assert f">{needle}<" in text, needle
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 4 and all(len(i) > 2000 for i in images)
    assert text.count('<tr class="baseline">') == 2  # the centralised row, in both tables
    assert "<td>0.4000</td>" in text and "2 rows in" in text


def test_names_from_the_job_are_escaped(job):
    text = write_report(job).read_text()
    assert "<script>" not in text
    assert "<title>job &lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; - fedpeft report</title>" in text
    assert text.count("<td>fedavg &lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;</td>") == 2


def test_missing_figures_say_so(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "benchmark.json").write_text(json.dumps(META))
    _record(job, "centralized", "centralized", 0.4, rounds=False)
    text = write_report(job).read_text()
    assert "<p>No federated test case.</p>" in text and "<p>No partition recorded.</p>" in text
    assert len(re.findall(r'src="data:image/png;base64,', text)) == 2  # final metrics, metrics per round
