"""The fault suite's quick cases: each fault lands in the category the suite promises.

Each case runs the CLI in a subprocess on the tiny model, so this file takes about 40 s.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import faults  # noqa: E402


def test_quick_cases_land_in_their_categories(tmp_path: Path) -> None:
    assert faults.main(["--quick", "--results-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "faults.json").read_text())
    got = {r["case"]: r["category"] for r in result["rows"]}
    assert got == {
        "missing data file": "clear error",
        "unknown key": "clear error",
        "min_clients > num_clients": "clear error",
        "a normal run": "worked",
        "flipped byte in the latest global_state.safetensors": "worked",
        "resume a folder that is not a run": "clear error",
    }
    assert "nope.jsonl" in next(r["detail"] for r in result["rows"] if r["case"] == "missing data file")
    assert "bit-equal" in next(r["detail"] for r in result["rows"] if r["case"].startswith("flipped byte"))
    assert result["goal"]["met"] and "6 cases" in result["markdown"]


def test_a_wrong_output_is_not_called_worked(tmp_path: Path) -> None:
    """The checks read the outputs: a run whose metrics repeat a round is a silent wrong result."""
    run = tmp_path / faults.RUN
    (run / "adapter").mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    from safetensors.torch import save_file
    import torch

    save_file({"w": torch.zeros(2)}, str(run / "adapter" / "adapter_model.safetensors"))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"round": r}) + "\n" for r in (1, 1, 2)))
    assert faults.check_run(tmp_path, faults.Proc(0, ""))[0] == "silent wrong result"
    save_file({"w": torch.tensor([float("nan")])}, str(run / "adapter" / "adapter_model.safetensors"))
    assert faults.check_run(tmp_path, faults.Proc(0, ""))[1] == "exit 0 with a non-finite adapter"
    assert faults.expect_error(faults.Proc(1, "error: something failed"), "job\\.yaml")[0] == "unclear error"
    assert faults.expect_error(faults.Proc(1, "Traceback (most recent call last):\n x"))[0] == "traceback"
