"""``fedpeft audit RUN_DIR`` on a finished tiny run: report.json, the tables, --compare, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny_jobs import tiny_job

from fedpeft.audit.canary import make_canaries
from fedpeft.audit.report import report_path
from fedpeft.cli import main
from fedpeft.config import AuditConfig, dump_config, validate_tree
from fedpeft.simulation import run_job

AUDIT = {"canaries": 2, "repetitions": 3, "candidates": 20}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 1-round, 2-client tiny run with 2 canaries planted 3 times into client 0."""
    job = tiny_job("audited", seed=4)
    job["federation"]["rounds"] = 1
    job.update(workspace=str(tmp_path_factory.mktemp("ws")), run_id="run", audit=AUDIT)
    return run_job(validate_tree(job)).path


def _files_holding(folder: Path, text: str) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and text in p.read_text(
        errors="ignore"))


def test_audit_writes_the_report_and_prints_tables_without_secrets(finished_run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(finished_run, other)
    summary = json.loads((other / "summary.json").read_text())
    (other / "summary.json").write_text(json.dumps({**summary, "epsilon": 7.5}))
    assert main(["audit", str(finished_run), "--compare", str(other)]) == 0
    out = capsys.readouterr().out
    report = json.loads(report_path(finished_run).read_text())
    planted, unseen = make_canaries(AuditConfig(**AUDIT), 4)
    assert [c["secret"] for c in report["canaries"]] == [c.secret for c in planted + unseen]
    assert [c["planted"] for c in report["canaries"]] == [True, True, False, False]
    assert all(c["candidates"] == 20 and 1 <= c["rank"] <= 21 for c in report["canaries"])
    assert report["summary"]["planted"]["count"] == report["summary"]["unseen"]["count"] == 2
    assert report["privacy"]["level"] == "none" and report["epsilon"] is None and report["round"] == 1
    assert json.loads(report_path(other).read_text())["epsilon"] == 7.5
    assert "planted 2" in out and "unseen 1" in out and "7.5" in out and str(other) in out
    assert not any(c.secret in out or c.name in out for c in planted + unseen)
    assert _files_holding(finished_run, planted[0].secret) == ["audit/report.json"]  # the run wrote it nowhere else


def test_the_canaries_were_planted_into_client_0(finished_run):
    sizes = [p["size"] for p in json.loads((finished_run / "partitions.json").read_text())]
    assert sizes[0] - sizes[1] in (6, 5, 7)  # IID halves differ by at most one row; 2 canaries x 3 planted


def test_a_run_without_canaries_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "plain"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(validate_tree(tiny_job("plain"))))
    assert main(["audit", str(run)]) == 2
    err = capsys.readouterr().err
    assert str(run) in err and "audit: {canaries: 4}" in err and len(err.strip().splitlines()) == 1


def test_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path, capsys):
    assert main(["audit", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "not a fedpeft run folder" in err


def test_too_few_candidates_is_a_clear_error(finished_run, capsys):
    assert main(["audit", str(finished_run), "--candidates", "3"]) == 2
    assert "--candidates must be at least 10" in capsys.readouterr().err


def test_fedpeft_run_of_a_job_with_canaries_audits_it_at_the_end(tmp_path, capsys):
    import yaml

    job = tiny_job("canary-cli", clients=2)
    job.update(workspace=str(tmp_path), run_id="r", audit=AUDIT)
    job["federation"]["rounds"] = 1
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["run", str(tmp_path / "job.yaml")]) == 0
    assert (tmp_path / "canary-cli" / "r" / "audit" / "report.json").is_file()
    assert "canary audit:" in capsys.readouterr().out
