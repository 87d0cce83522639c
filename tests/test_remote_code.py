"""A model that needs ``trust_remote_code`` (as the seed's ChatGLM does), offline: a tiny
custom-code model written from the fixtures, trained and evaluated end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedpeft.config import validate_tree
from fedpeft.errors import ModelError
from fedpeft.models import load_tokenizer, tiny_random_llama
from fedpeft.simulation import run_job
from tiny_jobs import tiny_job

FIXTURES = Path(__file__).parent / "fixtures" / "remote_code"


@pytest.fixture(scope="module")
def remote_model(tmp_path_factory) -> Path:
    """A local folder: tiny Llama weights, SmolLM2's tokenizer, a config naming custom classes."""
    folder = tmp_path_factory.mktemp("tinyremote")
    tok = load_tokenizer(validate_tree(tiny_job("x")).model)
    tiny_random_llama(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    for f in FIXTURES.glob("*.py"):
        shutil.copy(f, folder / f.name)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tinyremote", architectures=["TinyRemoteForCausalLM"], auto_map={
        "AutoConfig": "configuration_tinyremote.TinyRemoteConfig",
        "AutoModelForCausalLM": "modeling_tinyremote.TinyRemoteForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_custom_code_model_trains_and_evaluates_with_trust_remote_code(remote_model, tmp_path):
    job = {**tiny_job("remote"), "workspace": str(tmp_path),
           "model": {"name": str(remote_model), "trust_remote_code": True}}
    run = run_job(validate_tree(job))
    summary = run.read_summary()
    assert summary["trainable_parameters"] > 0 and summary["final"]["rougeL"] >= 0
    from fedpeft.adapters import load_adapter

    model, _ = load_adapter(run.adapter_dir)
    assert type(model.get_base_model()).__name__ == "TinyRemoteForCausalLM"  # the custom class ran


def test_without_trust_remote_code_it_is_a_model_error_saying_so(remote_model, tmp_path):
    from fedpeft.models import load_base_model

    with pytest.raises(ModelError, match="ships its own model code.*model.trust_remote_code: true"):
        load_base_model(validate_tree({**tiny_job("r"), "model": {"name": str(remote_model)}}).model)
