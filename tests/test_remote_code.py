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


def test_a_prompt_template_lays_out_every_prompt_and_the_saved_adapter_keeps_it(tmp_path, tokenizer):
    from fedpeft.adapters import load_adapter
    from fedpeft.data.prompts import chat_template_from, prompt_ids

    tok = load_tokenizer(validate_tree(tiny_job("x")).model)
    tok.chat_template = chat_template_from("{bos}Q: {question}\nA:")
    ids = prompt_ids(tok, "What is gout?")
    assert ids == [tok.bos_token_id] + tok("Q: What is gout?\nA:", add_special_tokens=False)["input_ids"]
    job = {**tiny_job("tmpl"), "workspace": str(tmp_path), "data": {**tiny_job("x")["data"],
                                                                     "prompt_template": "{bos}Q: {question}\nA:"}}
    run = run_job(validate_tree(job))
    _, loaded = load_adapter(run.adapter_dir)
    assert prompt_ids(loaded, "What is gout?") == ids  # `fedpeft generate` prompts as training did


def test_prompt_template_problems_are_config_errors():
    from fedpeft.errors import ConfigError

    for template, message in [("{bos}{quesiton}", r"unknown placeholder \{quesiton\}"), ("{bos}hello", "no {question}")]:
        with pytest.raises(ConfigError, match=message):
            validate_tree({**tiny_job("x"), "data": {"prompt_template": template}})
