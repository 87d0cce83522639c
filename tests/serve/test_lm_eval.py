"""``fedpeft eval --lm-eval``: lm-evaluation-harness on the base model and on adapters, offline, on the
local tasks in tests/fixtures/lm_eval; its accuracy is the one a direct log-likelihood computation
gives; bad input is a one-line error."""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tiny_jobs import tiny_job

from fedpeft.cli import main
from fedpeft.io_utils import read_jsonl, write_jsonl

pytest.importorskip("lm_eval")

FIXTURES = Path(__file__).parents[1] / "fixtures" / "lm_eval"
MC, GEN, GROUP = "fedpeft_tiny_mc", "fedpeft_tiny_gen", "fedpeft_tiny"  # defined in FIXTURES (GROUP: MC and GEN)
ROWS = read_jsonl(FIXTURES / "tiny_qa.jsonl")


def _adapter(folder: Path, base: torch.nn.Module, method: str, scale: float, **params) -> Path:
    """An adapter folder (as fedpeft export writes one) with large seeded random weights, so that it
    changes the tiny model's choices."""
    from fedpeft.adapters import get_trainable_state, save_adapter
    from fedpeft.config import validate_tree
    from fedpeft.peft_methods import build_peft_method, wrap_model

    cfg = validate_tree({**tiny_job("lm"), "peft": {"method": method, **params}})
    model = wrap_model(copy.deepcopy(base), build_peft_method(method, params))
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) * scale for k, v in get_trainable_state(model).items()}
    save_adapter(model, state, folder, cfg)
    return folder


@pytest.fixture(scope="module")
def lora(tiny_base, tmp_path_factory) -> Path:
    return _adapter(tmp_path_factory.mktemp("lm") / "lora", tiny_base[0], "lora", 0.5, r=4)


def _loglikelihoods(model: torch.nn.Module, tok, context: str, continuations: list[str]) -> list[float]:
    """log p(continuation | context) of each continuation, tokenised as lm-eval tokenises it (the whole,
    split after the context); one batch, padded on the right, which a causal model never sees."""
    start = len(tok(context, add_special_tokens=False).input_ids)
    wholes = [tok(context + c, add_special_tokens=False).input_ids for c in continuations]
    width = max(map(len, wholes))
    ids = torch.tensor([w + [0] * (width - len(w)) for w in wholes])  # (choices, width)
    with torch.no_grad():
        logp = model(ids).logits[:, -width:].log_softmax(-1)  # (choices, width, vocab): no virtual tokens
    return [sum(logp[r, i - 1, w[i]].item() for i in range(start, len(w))) for r, w in enumerate(wholes)]


def _accuracy(model: torch.nn.Module, tok, rows: list[dict] = ROWS) -> float:
    """The share of ``rows`` whose gold choice is the most likely after the MC task's prompt."""
    right = 0
    for row in rows:
        scores = _loglikelihoods(model, tok, f"Question: {row['question']}\nAnswer:", [" " + c for c in row["choices"]])
        right += scores.index(max(scores)) == row["label"]
    return right / len(rows)


def _json_caches() -> list[Path]:
    """What ``datasets`` holds in its own cache for JSON files."""
    import datasets

    return sorted((Path(datasets.config.HF_DATASETS_CACHE) / "json").glob("*"))


def _on(base: torch.nn.Module, adapter: Path) -> PeftModel:
    return PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()


def test_lm_eval_scores_the_base_model_and_the_adapter_side_by_side(lora, tiny_base, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the tasks' data files are found beside their YAML, not in the working directory
    out, test = tmp_path / "out", tmp_path / "qa.jsonl"
    write_jsonl(test, [{"question": r["question"], "answer": r["choices"][r["label"]]} for r in ROWS[:2]])
    hub_offline, datasets_cache = os.environ.get("HF_HUB_OFFLINE"), _json_caches()
    assert main(["eval", str(lora), "--base", "--test", str(test), "--lm-eval", GROUP,
                 "--lm-eval-include", str(FIXTURES), "--out", str(out), "eval.max_new_tokens=4"]) == 0
    summary = json.loads((out / "lm_eval.json").read_text())
    assert summary["columns"] == ["base", "lora"] and summary["documents"][MC]["effective"] == len(ROWS)
    base, tok = tiny_base
    expected = {"base": _accuracy(base, tok), "lora": _accuracy(_on(base, lora), tok)}
    assert expected["base"] != expected["lora"]  # premise: the adapter changes the choices
    acc = {label: summary["results"][MC][label]["acc"] for label in expected}
    assert {label: a["value"] for label, a in acc.items()} == pytest.approx(expected, abs=1e-9)
    for label in expected:  # the standard error lm-eval reports: of the mean of the per-question scores
        scores = [r["acc"] for r in read_jsonl(out / label / "lm_eval" / f"{MC}.jsonl")]
        assert acc[label]["stderr"] == pytest.approx(statistics.stdev(scores) / math.sqrt(len(scores)))
    assert summary["differences"][MC]["lora"]["acc"] == pytest.approx(expected["lora"] - expected["base"])
    answers = {label: [r["response"] for r in read_jsonl(out / label / "lm_eval" / f"{GEN}.jsonl")]
               for label in expected}
    assert len(answers["lora"]) == len(ROWS) and answers["lora"] != answers["base"]  # the adapter generated
    printed = " ".join(capsys.readouterr().out.split())
    assert "| task | metric | base | lora | lora - base |" in printed
    assert f"| {MC} | acc | {expected['base']:.4f} ± {acc['base']['stderr']:.4f} |" in printed
    assert "| lora - base (95% CI) |" in printed  # fedpeft's own table of the --test file is there too
    assert set(json.loads((out / "eval.json").read_text())["results"]["qa"]) == {"base", "lora"}
    assert "lm-eval" in (out / "results.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "qa.jsonl"] and not (out / "lm_eval_cache").exists()
    assert _json_caches() == datasets_cache  # datasets cached the task's data in the results folder only
    assert os.environ.get("HF_HUB_OFFLINE") == hub_offline  # offline mode was for lm-eval's run only


def test_prompt_tuning_is_scored_on_the_input_positions_not_its_virtual_tokens(tiny_base, tmp_path):
    """lm-eval reads the logits after the virtual tokens prompt tuning prepends; a task YAML file given
    as such; --lm-eval-limit N."""
    adapter = _adapter(tmp_path / "pt", tiny_base[0], "prompt_tuning", 1.0, num_virtual_tokens=4)
    out = tmp_path / "out"
    assert main(["eval", str(adapter), "--lm-eval", str(FIXTURES / f"{MC}.yaml"), "--lm-eval-limit", "4",
                 "--out", str(out)]) == 0
    base, tok = tiny_base
    model = _on(base, adapter)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[1] == 3 + 4  # premise: logits of the virtual tokens too
    summary = json.loads((out / "lm_eval.json").read_text())
    assert summary["documents"][MC]["effective"] == 4 and summary["limit"] == 4
    assert summary["results"][MC]["pt"]["acc"]["value"] == pytest.approx(_accuracy(model, tok, ROWS[:4]), abs=1e-9)
    first = read_jsonl(out / "pt" / "lm_eval" / f"{MC}.jsonl")[0]
    row = ROWS[first["doc_id"]]
    lls = [r[0] for r in first["response"]]
    context = f"Question: {row['question']}\nAnswer:"
    assert lls == pytest.approx(_loglikelihoods(model, tok, context, [" " + c for c in row["choices"]]), abs=1e-4)


def _hub_task(tmp_path: Path) -> Path:
    folder = tmp_path / "tasks"
    folder.mkdir()
    text = (FIXTURES / f"{MC}.yaml").read_text().replace(f"task: {MC}", "task: on_the_hub")
    text = text.replace("dataset_path: json", "dataset_path: fedpeft-tests/no-such-dataset")
    (folder / "hub.yaml").write_text(text.replace("dataset_kwargs:\n  data_files:\n    test: tiny_qa.jsonl\n", ""))
    (folder / "lost.yaml").write_text((FIXTURES / f"{MC}.yaml").read_text().replace(f"task: {MC}", "task: lost"))
    return folder


@pytest.mark.parametrize("case", ["unknown", "hub", "missing_file", "prompt_learning_generates", "no_library",
                                  "nothing_to_do"])
def test_errors_are_one_line_saying_what_to_do(lora, tiny_base, tmp_path, monkeypatch, capsys, case):
    out = tmp_path / "out"
    args = ["eval", str(lora), "--lm-eval", MC, "--lm-eval-include", str(FIXTURES), "--out", str(out)]
    if case == "unknown":  # a misspelt lm-eval task: its whole index is searched (seconds)
        args[3], message = "hellaswg", "did you mean hellaswag"
    elif case in ("hub", "missing_file"):
        args[3], args[5] = ("on_the_hub" if case == "hub" else "lost"), str(_hub_task(tmp_path))
        message = "(OfflineModeIsEnabled)" if case == "hub" else "relative data_files are read from"
    elif case == "prompt_learning_generates":
        args[1] = str(_adapter(tmp_path / "pt", tiny_base[0], "prompt_tuning", 1.0, num_virtual_tokens=4))
        args[3], message = GEN, "score it on loglikelihood tasks"
    elif case == "no_library":
        monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets when it is not installed
        monkeypatch.delitem(sys.modules, "fedpeft.serve.lm_eval_bridge", raising=False)
        message = "pip install 'lm-eval>="
    else:
        args, message = ["eval", str(lora), "--out", str(out)], "give --test FILE"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0, err
    if case == "unknown":
        assert "lm-eval ls tasks" in err
    assert not out.exists()  # no results folder left behind
