"""The command line without training: ``fedpeft validate`` on jobs and benchmark files."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpeft.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("path", "cases"), [("examples/ianvs/benchmarkingjob.yaml", 4),
                                             ("configs/benchmark-sample.yaml", 2)])
def test_validate_accepts_the_benchmark_files_run_accepts(path, cases, capsys):
    assert main(["validate", str(REPO / path)]) == 0
    assert ": OK (benchmark '" in capsys.readouterr().out
    assert main(["validate", str(REPO / path), "eval.max_samples=0"]) == 2  # overrides reach every test case
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cases} problems in") and err.count("eval.max_samples: Input should be") == cases


def test_validate_lists_the_problems_of_every_test_case(tmp_path, capsys):
    bench = tmp_path / "bench.yaml"
    bench.write_text("job: b\nmodel: {name: tiny-random-llama}\nfederation: {num_clients: 2}\n"
                     "grid:\n  peft:\n    - {method: lora, r: big}\n    - {method: lora, r: 4}\n"
                     "    - {method: ptuning, num_virtual_tokens: many}\n"
                     "baselines: [zero_shot]\n")
    assert main(["validate", str(bench)]) == 2
    err = capsys.readouterr().err
    assert "2 problems in" in err
    assert "(test case 1: peft.method=lora, peft.r=big): peft.r:" in err
    assert "(test case 3: peft.method=ptuning, peft.num_virtual_tokens=many): peft.num_virtual_tokens:" in err


def test_validate_runs_the_preflight_checks_on_every_test_case(tmp_path, capsys):
    """Data files and target_modules are checked per test case, as for a single job."""
    bench = tmp_path / "bench.yaml"
    bench.write_text(f"job: b\nmodel: {{name: tiny-random-llama}}\ndata: {{train: {tmp_path / 'gone.jsonl'}}}\n"
                     "grid:\n  peft:\n    - {method: lora, r: 2, target_modules: [nowhere]}\n"
                     "    - {method: lora, r: 4}\n")
    assert main(["validate", str(bench)]) == 2
    err = capsys.readouterr().err
    assert err.count("gone.jsonl") == 1 and "test case" in err  # one data problem, listed once for both cases
    assert "nowhere" in err
