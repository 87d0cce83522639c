"""``fedpeft export``: the adapter folder and the merged model load with plain PEFT / transformers
and answer as the adapter does; what cannot be exported faithfully is a clear one-line error."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from serve_helpers import NEW_TOKENS, PENALTY, SYSTEM
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedpeft.cli import main
from fedpeft.data.prompts import chat_template_from
from fedpeft.generation import generate_answers
from fedpeft.serve.saved import open_adapter

QUESTIONS = ["What is gout?", "How is asthma treated?", "What causes the flu?"]
ANSWER = dict(system_prompt=SYSTEM, max_new_tokens=NEW_TOKENS, repetition_penalty=PENALTY, progress=False)


def test_merged_model_loads_with_transformers_and_answers_as_the_adapter(served_run, tiny_base, tmp_path):
    out = tmp_path / "merged"
    assert main(["export", "--adapter", str(served_run), "--merge", str(out)]) == 0
    merged, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert not any("lora_" in n for n, _ in merged.named_parameters())  # plain weights, no adapter left
    base = copy.deepcopy(tiny_base[0])
    without = generate_answers(base, tiny_base[1], QUESTIONS, **ANSWER)
    with_adapter = generate_answers(PeftModel.from_pretrained(base, served_run / "adapter"), tiny_base[1],
                                    QUESTIONS, **ANSWER)
    assert with_adapter != without  # premise: the adapter changes the greedy answers
    assert generate_answers(merged, tok, QUESTIONS, **ANSWER) == with_adapter
    # a serving stack that knows nothing of fedpeft: the saved chat template and generation config alone
    prompt = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    info = json.loads((out / "fedpeft_export.json").read_text())
    assert info["system_prompt"] == SYSTEM and info["generation"]["repetition_penalty"] == PENALTY
    new = merged.generate(**prompt, repetition_penalty=PENALTY)[0, prompt["input_ids"].shape[1]:]
    assert tok.decode(new, skip_special_tokens=True).strip() == with_adapter[0]


def test_adapter_folder_loads_with_peft_and_keeps_the_job_settings(served_run, tiny_base, tmp_path):
    out = tmp_path / "elsewhere" / "adapter"  # no run config.yaml beside it: the settings travel inside
    assert main(["export", "--adapter", str(served_run / "adapter"), "--out", str(out)]) == 0
    loaded = PeftModel.from_pretrained(copy.deepcopy(tiny_base[0]), out)
    saved = load_file(str(served_run / "adapter" / "adapter_model.safetensors"))
    assert saved and all(torch.equal(t, load_file(str(out / "adapter_model.safetensors"))[k]) for k, t in saved.items())
    assert sum("lora_" in n for n, _ in loaded.named_parameters()) == len(saved)
    assert AutoTokenizer.from_pretrained(out).chat_template == tiny_base[1].chat_template
    exported = open_adapter(out)
    assert (exported.system_prompt, exported.max_new_tokens, exported.repetition_penalty) == (SYSTEM, NEW_TOKENS,
                                                                                              PENALTY)


def test_a_prompt_template_becomes_the_exported_chat_template(make_adapter, tmp_path):
    adapter = make_adapter("lora", r=2)
    info = json.loads((adapter / "fedpeft_model.json").read_text())
    (adapter / "fedpeft_model.json").write_text(json.dumps({**info, "prompt_template": "{bos}Q: {question}\nA:"}))
    assert main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "a"), "--merge", str(tmp_path / "m")]) == 0
    for out in ("a", "m"):
        tok = AutoTokenizer.from_pretrained(tmp_path / out)
        assert tok.chat_template == chat_template_from("{bos}Q: {question}\nA:")
        assert tok.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False).endswith("Q: Hi?\nA:")


def test_a_quantised_base_is_merged_only_dequantised(served_run, tmp_path, capsys):
    adapter = tmp_path / "q4" / "adapter"
    shutil.copytree(served_run / "adapter", adapter)
    info = json.loads((adapter / "fedpeft_model.json").read_text())
    info["model"]["quantization"] = "4bit"
    (adapter / "fedpeft_model.json").write_text(json.dumps(info))
    assert main(["export", "--adapter", str(adapter), "--merge", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "model.quantization: 4bit" in err and "--dequantize" in err and not (tmp_path / "m").exists()
    assert main(["export", "--adapter", str(adapter), "--merge", str(tmp_path / "m"), "--dequantize"]) == 0
    assert main(["export", "--adapter", str(served_run), "--merge", str(tmp_path / "plain")]) == 0
    a, b = load_file(str(tmp_path / "m" / "model.safetensors")), load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the unquantised base, merged


@pytest.mark.parametrize("method", ["ptuning", "prefix", "prompt_tuning"])
def test_a_prompt_learning_adapter_is_not_merged(make_adapter, tmp_path, capsys, method):
    adapter = make_adapter(method, num_virtual_tokens=4)
    assert main(["export", "--adapter", str(adapter), "--merge", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert f"a {method} adapter cannot be merged" in err and f"--adapter {adapter} --out OUT" in err
    assert "Traceback" not in err and not (tmp_path / "m").exists()
    assert main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "a")]) == 0  # what the error suggests
    assert (tmp_path / "a" / "adapter_config.json").is_file()


def test_an_output_folder_is_replaced_only_with_force(served_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", "--adapter", str(served_run), "--out", str(out)]) == 2
    assert "already holds files" in capsys.readouterr().err and (out / "keep.txt").is_file()
    assert main(["export", "--adapter", str(served_run), "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "adapter_config.json").is_file()
    # the run folder holds the adapter: replacing it would delete what is exported
    assert main(["export", "--adapter", str(served_run), "--out", str(served_run), "--force"]) == 2
    assert "must lie outside the adapter folder" in capsys.readouterr().err
    assert (served_run / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize(("make", "needle"), [
    (lambda p: p / "missing", "no such folder"),
    (lambda p: p, "neither an adapter folder (no fedpeft_model.json) nor a run folder (no config.yaml)"),
    (lambda p: (p / "f.txt", (p / "f.txt").write_text("x"))[0], "is a file"),
    (lambda p: (p, (p / "config.yaml").write_text("job: x\n"))[0], "run folder without a final adapter/"),
    (lambda p: (p, (p / "adapter_config.json").write_text("{}"))[0], "a PEFT adapter that fedpeft did not write"),
], ids=["missing", "empty", "file", "unfinished-run", "foreign-peft"])
@pytest.mark.parametrize("command", [["export", "--out", "OUT"], ["chat"], ["generate", "Why?"]],
                         ids=["export", "chat", "generate"])
def test_a_folder_that_is_no_adapter_is_a_clear_error(tmp_path, capsys, make, needle, command):
    folder = make(tmp_path)
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in command] + ["--adapter", str(folder)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err


def test_export_needs_out_or_merge(served_run, capsys):
    assert main(["export", "--adapter", str(served_run)]) == 2
    assert "give --out OUT" in capsys.readouterr().err
