"""A finished tiny run (1 round, system prompt, job generation settings) and hand-made adapter folders."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from serve_helpers import NEW_TOKENS, PENALTY, SYSTEM
from tiny_jobs import tiny_job

from fedpeft.cli import main


@pytest.fixture(scope="session")
def served_run(tmp_path_factory) -> Path:
    """The run folder of a 1-round LoRA job whose adapter changes the tiny model's greedy answers."""
    root = tmp_path_factory.mktemp("served")
    job = tiny_job("serve")
    job.update(workspace=str(root / "ws"), run_id="r1", peft={"method": "lora", "r": 4})
    job["data"] = {**job["data"], "system_prompt": SYSTEM}
    job["federation"] = {**job["federation"], "rounds": 1}
    job["train"] = {**job["train"], "learning_rate": 5e-2, "max_steps": 2}
    job["eval"] = {**job["eval"], "max_new_tokens": NEW_TOKENS, "repetition_penalty": PENALTY}
    (root / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["run", str(root / "job.yaml")]) == 0
    return root / "ws" / "serve" / "r1"


@pytest.fixture
def make_adapter(tiny_base, tmp_path):
    """``make_adapter(method, **params)``: an untrained adapter folder saved as a run saves one (no run folder)."""
    from fedpeft.adapters import get_trainable_state, save_adapter
    from fedpeft.config import validate_tree
    from fedpeft.peft_methods import build_peft_method, wrap_model

    def make(method: str, **params) -> Path:
        cfg = validate_tree({**tiny_job("hand"), "peft": {"method": method, **params}})
        model = wrap_model(copy.deepcopy(tiny_base[0]), build_peft_method(method, params))
        out = tmp_path / f"{method}-adapter"
        save_adapter(model, get_trainable_state(model), out, cfg)
        return out

    return make
