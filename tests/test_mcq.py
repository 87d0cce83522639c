"""Multiple-choice accuracy: length normalisation by hand, transformers' own loss as the reference
of every option score (base, LoRA, P-Tuning, prefix tuning; batched and alone), the readers of each
format, `fedpeft data mcq`, and `eval.mcq` in a job."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from peft import LoraConfig, MultitaskPromptTuningConfig, PrefixTuningConfig, PromptEncoderConfig, get_peft_model

from fedpeft.cli import main
from fedpeft.config import load_config
from fedpeft.data import mcq_io
from fedpeft.data.mcq_command import make_items
from fedpeft.data.prompts import prompt_ids
from fedpeft.errors import ConfigError, DataError, ModelError
from fedpeft.io_utils import read_jsonl, write_jsonl
from fedpeft.mcq import (KEY_MCQ_ACCURACY, McqItem, load_mcq, mcq_accuracy, mcq_accuracy_ci, mcq_correct,
                         mcq_scores, option_scores)
from fedpeft.simulation import run_job
from tiny_jobs import QUIET_EVAL, tiny_job

ITEMS = [
    McqItem("What is high blood pressure?", ("Blood pressure that stays above normal.", "A cold.",
                                              "A kind of bone fracture that heals slowly in older people."), 0),
    McqItem("Who gets gout?", ("Children.", "Mostly men, and people who eat a lot of meat.", "Nobody."), 1),
    McqItem("How is the flu treated in young children who also have asthma and a fever?",
            ("Rest and fluids.", "Surgery.", "Antibiotics for every case, at once.", "Nothing at all."), 0),
    McqItem("What is diabetes?", ("High blood sugar.", "Low blood sugar after a long and hard run."), 0),
    McqItem("Can asthma be cured?", ("No, but it can be controlled with inhalers.", "Yes.", "Only by diet."), 0),
]


def _flat(scores: list[list[float]]) -> list[float]:
    return [s for row in scores for s in row]


# ---------------------------------------------------------------------------------------------
# Length normalisation on a model whose log-probabilities are set by hand


class _CharTokenizer:
    """One token per character (its code point); no chat template, so prompts read 'Question: ...'."""

    chat_template = None
    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) for c in text]}


class _NextCharModel(torch.nn.Module):
    """log p(next | current character): after ' ' (the prompt's last character) 'a' gets -1.2 and
    'b' -1.5; after 'b', 'b' gets -0.3. Everything else shares the remaining mass uniformly."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a device for model_device()
        probs = torch.full((128, 128), 1.0 / 128, dtype=torch.float64)
        for current, fixed in ((" ", {"a": -1.2, "b": -1.5}), ("b", {"b": -0.3})):
            row = torch.zeros(128, dtype=torch.float64)
            for char, logp in fixed.items():
                row[ord(char)] = torch.tensor(logp, dtype=torch.float64).exp()
            rest = [i for i in range(128) if row[i] == 0]
            row[rest] = (1 - row.sum()) / len(rest)
            probs[ord(current)] = row
        self.register_buffer("table", probs.log().float())  # (vocab, vocab) of log-probabilities

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])  # (batch, seq, vocab)


def test_options_are_scored_by_mean_token_log_probability():
    tok, model = _CharTokenizer(), _NextCharModel()
    assert prompt_ids(tok, "Which?")[-1] == ord(" ")  # the options follow "Answer: "
    items = [McqItem("Which?", ("a", "bbb"), 1), McqItem("A longer question, so rows get padding?", ("bbb", "a"), 0)]
    # "a": -1.2 in one token. "bbb": -1.5 - 0.3 - 0.3 = -2.1 in all, so summing would pick "a";
    # per token it is -0.7, above -1.2.
    scores = option_scores(model, tok, items, batch_size=4, progress=False)  # both items in one pass
    assert _flat(scores) == pytest.approx([-1.2, -0.7, -0.7, -1.2], abs=1e-5)
    assert mcq_scores(model, tok, items, batch_size=1, progress=False) == [1, 0]
    assert mcq_accuracy([1, 0], items) == 1.0 and mcq_correct([0, 0], items) == [False, True]


def test_max_seq_len_cuts_options_as_training_cuts_answers():
    tok, model = _CharTokenizer(), _NextCharModel()
    # max_seq_len 4: the prompt keeps its last 2 tokens (": "), each option 2 at most: 'bbb' is scored
    # as 'bb', (-1.5 - 0.3) / 2 = -0.9
    cut = option_scores(model, tok, [McqItem("Which?", ("a", "bbb"), 1)], max_seq_len=4, progress=False)
    assert _flat(cut) == pytest.approx([-1.2, -0.9], abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Every score equals transformers' own mean loss on the option, batched or alone


def _perturb(params: list[torch.nn.Parameter], seed: int, std: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * std)


def _adapted(sharp: torch.nn.Module, kind: str) -> torch.nn.Module:
    if kind == "base":
        return sharp
    config = {
        "lora": LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "ptuning": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, encoder_hidden_size=32),
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, prefix_projection=True,
                                     encoder_hidden_size=32),
    }[kind]
    model = get_peft_model(copy.deepcopy(sharp), config)
    _perturb([p for n, p in model.named_parameters() if p.requires_grad], seed=1, std=0.5)
    return model.eval()


def _reference_scores(model, tokenizer, items) -> list[list[float]]:  # noqa: ANN001
    """Minus transformers' mean cross-entropy of each option's tokens, one unpadded sequence at a time."""
    out = []
    with torch.no_grad():
        for item in items:
            prompt = prompt_ids(tokenizer, item.question)
            row = []
            for option in item.options:
                ids = tokenizer(option, add_special_tokens=False)["input_ids"]
                labels = torch.tensor([[-100] * len(prompt) + ids])
                row.append(-float(model(input_ids=torch.tensor([prompt + ids]), labels=labels).loss))
            out.append(row)
    return out


@pytest.mark.parametrize("kind", ["base", "lora", "ptuning", "prefix"])
def test_scores_match_the_models_own_loss_batched_and_alone(kind, sharp, tokenizer):
    model = _adapted(sharp, kind)
    reference = _reference_scores(model, tokenizer, ITEMS)
    batched = option_scores(model, tokenizer, ITEMS, batch_size=8, progress=False)  # several items a pass
    alone = option_scores(model, tokenizer, ITEMS, batch_size=1, progress=False)  # one item a pass
    for ref, b, a in zip(reference, batched, alone):
        assert b == pytest.approx(ref, abs=1e-4) and a == pytest.approx(ref, abs=1e-4)
    chosen = mcq_scores(model, tokenizer, ITEMS, batch_size=8, progress=False)
    assert chosen == mcq_scores(model, tokenizer, ITEMS, batch_size=1, progress=False)
    assert chosen == [max(range(len(r)), key=r.__getitem__) for r in reference]
    assert len(set(chosen)) > 1  # the model does not pick the same index everywhere


@pytest.mark.parametrize("kind", ["base", "ptuning"])
def test_models_that_compute_every_logit_score_the_same(kind, sharp, tokenizer, monkeypatch):
    model = _adapted(sharp, kind)
    kept = option_scores(model, tokenizer, ITEMS, batch_size=8, progress=False)
    monkeypatch.setattr("fedpeft.losses._plain_head", lambda model: None)  # ChatGLM's remote code, say: every logit
    every = option_scores(model, tokenizer, ITEMS, batch_size=8, progress=False)
    assert _flat(every) == pytest.approx(_flat(kept), abs=1e-5)


def test_mcq_option_tokens_scores_only_the_start_of_each_option(sharp, tokenizer):
    whole = option_scores(sharp, tokenizer, ITEMS, progress=False)
    assert option_scores(sharp, tokenizer, ITEMS, max_option_tokens=10_000, progress=False) == whole
    first = option_scores(sharp, tokenizer, ITEMS, max_option_tokens=1, progress=False)
    with torch.no_grad():
        for item, scores in zip(ITEMS, first):
            prompt = prompt_ids(tokenizer, item.question)
            logp = torch.log_softmax(sharp(input_ids=torch.tensor([prompt])).logits[0, -1].float(), -1)
            heads = [tokenizer(o, add_special_tokens=False)["input_ids"][0] for o in item.options]
            assert scores == pytest.approx([float(logp[t]) for t in heads], abs=1e-4)  # each option's first token
    assert _flat(first) != pytest.approx(_flat(whole), abs=1e-3)


def test_adapters_change_the_scores(sharp, tokenizer):
    base = _flat(option_scores(sharp, tokenizer, ITEMS[:2], progress=False))
    for kind in ("lora", "ptuning", "prefix"):
        adapted = _flat(option_scores(_adapted(sharp, kind), tokenizer, ITEMS[:2], progress=False))
        assert adapted != pytest.approx(base, abs=1e-3)


def test_scoring_restores_train_mode_and_refuses_other_prompt_learning(sharp, tokenizer):
    model = _adapted(sharp, "lora").train()
    option_scores(model, tokenizer, ITEMS[:1], progress=False)
    assert model.training
    config = MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, num_tasks=1)
    with pytest.raises(ModelError, match="MULTITASK_PROMPT_TUNING"):
        option_scores(get_peft_model(copy.deepcopy(sharp), config), tokenizer, ITEMS[:1], progress=False)


def test_accuracy_interval_brackets_the_accuracy():
    correct = [True] * 30 + [False] * 10
    low, high = mcq_accuracy_ci(correct, seed=1)
    assert low < 0.75 < high and 0.5 < low and high < 0.95
    assert mcq_accuracy_ci(correct, seed=1) == (low, high)


# ---------------------------------------------------------------------------------------------
# Readers


READER_CASES = {
    "fedpeft": ([{"question": "Q1?", "options": ["x", "y"], "answer": 1, "id": 7},
                 {"question": "Q2?", "options": ["u", "v", "w"], "answer": 0}],
                [McqItem("Q1?", ("x", "y"), 1), McqItem("Q2?", ("u", "v", "w"), 0)]),
    "pubmedqa": ([{"question": "Does it help?", "context": {"contexts": ["First.", "Second."]}, "final_decision": "no"},
                  {"QUESTION": "Is it safe?", "CONTEXTS": ["Only."], "final_decision": "maybe"}],
                 [McqItem("First.\nSecond.\nDoes it help?", ("yes", "no", "maybe"), 1),
                  McqItem("Only.\nIs it safe?", ("yes", "no", "maybe"), 2)]),
    "medmcqa": ([{"question": "M1?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 2},
                 {"question": "M2?", "opa": "e", "opb": "f", "opc": "g", "opd": "h", "cop": 0}],
                [McqItem("M1?", ("a", "b", "c", "d"), 2), McqItem("M2?", ("e", "f", "g", "h"), 0)]),
    "medqa": ([{"question": "U1?", "answer": "c", "options": {"B": "b", "A": "a", "C": "c", "D": "d"},
                "answer_idx": "C"},
               {"question": "U2?", "options": [{"key": "A", "value": "p"}, {"key": "B", "value": "q"}],
                "answer_idx": "A"}],
              [McqItem("U1?", ("a", "b", "c", "d"), 2), McqItem("U2?", ("p", "q"), 0)]),
    "careqa": ([{"question": "C1?", "op1": "a", "op2": "b", "op3": "c", "op4": "d", "cop": 1, "year": 2020},
                {"question": "C2?", "op1": "e", "op2": "f", "op3": "g", "op4": "h", "cop": 4}],
               [McqItem("C1?", ("a", "b", "c", "d"), 0), McqItem("C2?", ("e", "f", "g", "h"), 3)]),
}


@pytest.mark.parametrize("fmt", list(READER_CASES))
def test_each_format_is_detected_and_read(fmt, tmp_path):
    rows, expected = READER_CASES[fmt]
    write_jsonl(tmp_path / "items.jsonl", rows)
    assert mcq_io.detect_format(rows[0]) == fmt
    assert load_mcq(tmp_path / "items.jsonl") == expected
    assert load_mcq(tmp_path / "items.jsonl", max_items=1) == expected[:1]


@pytest.mark.parametrize("bad, match", [
    ({"question": "M?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 4}, "'cop' must be an integer in 0..3"),
    ({"question": "M?", "opa": "a", "opb": " ", "opc": "c", "opd": "d", "cop": 1}, "'opb' must be non-empty text"),
    ({"question": "M?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": -1}, "test split hides its answers"),
    ({"question": "M?", "opa": "a", "opb": "b", "opc": "c", "cop": 1}, "'opd' must be non-empty text, got missing"),
])
def test_a_bad_row_names_file_and_line(bad, match, tmp_path):
    path = tmp_path / "medmcqa.jsonl"
    write_jsonl(path, [READER_CASES["medmcqa"][0][0], bad])
    with pytest.raises(DataError, match=match) as e:
        load_mcq(path)
    assert f"{path}:2" in str(e.value) and "medmcqa format" in str(e.value)


def test_an_unknown_format_or_missing_file_is_a_data_error(tmp_path):
    write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q?", "answer": "A."}])
    with pytest.raises(DataError, match=r"qa.jsonl:1: not a multiple-choice record.*'question', 'answer'"):
        load_mcq(tmp_path / "qa.jsonl")
    with pytest.raises(DataError, match="multiple-choice file not found"):
        load_mcq(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------------------------
# fedpeft data mcq


def _medquad_rows() -> list[dict]:
    rows = []
    for qtype, topics in (("symptoms", 6), ("treatment", 5)):
        for t in range(topics):
            rows.append({"id": f"{qtype}-{t}", "question": f"What are the {qtype} of disease {t}?",
                         "answer": f"The {qtype} of disease {t} are these.", "qtype": qtype, "focus": f"disease {t}"})
    # a second answer about disease 0's symptoms: never a distractor for disease 0
    rows.append({"id": "symptoms-0b", "question": "What are the signs of disease 0?",
                 "answer": "Signs of disease 0 include those.", "qtype": "symptoms", "focus": "disease 0"})
    rows += [{"id": f"rare-{t}", "question": f"Is disease {t} inherited?", "answer": f"Disease {t}: maybe.",
              "qtype": "inheritance", "focus": f"disease {t}"} for t in range(2)]  # too few: skipped
    return rows


def test_data_mcq_draws_distractors_of_the_same_qtype_on_other_topics(tmp_path, capsys):
    rows = _medquad_rows()
    write_jsonl(tmp_path / "medquad.jsonl", rows)
    out = tmp_path / "mcq.jsonl"
    assert main(["data", "mcq", str(tmp_path / "medquad.jsonl"), "--out", str(out), "--seed", "3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"items": 12, "skipped": 2, "out": str(out)}
    by_answer = {r["answer"]: r for r in rows}
    records = read_jsonl(out)
    for record in records:
        options = record["options"]
        assert len(options) == 4 and len(set(options)) == 4
        assert by_answer[options[record["answer"]]]["id"] == record["id"]  # the right option is the row's answer
        for k, text in enumerate(options):
            if k != record["answer"]:
                assert by_answer[text]["qtype"] == record["qtype"] and by_answer[text]["focus"] != record["focus"]
    assert {r["answer"] for r in records} != {records[0]["answer"]}  # the right option moves about
    assert load_mcq(out)[0] == McqItem(records[0]["question"], tuple(records[0]["options"]), records[0]["answer"])


def test_data_mcq_is_deterministic_with_its_seed():
    rows = _medquad_rows()
    first, skipped = make_items(rows, seed=3)
    assert make_items(rows, seed=3) == (first, skipped) and skipped == {"inheritance": 2}
    assert make_items(rows, seed=4)[0] != first
    assert make_items(rows, seed=3, max_items=5)[0] == make_items(rows, seed=3, max_items=5)[0]
    assert len(make_items(rows, seed=3, max_items=5)[0]) <= 5
    assert make_items(rows, distractors=5)[1] == {"inheritance": 2, "treatment": 5}  # 4 other topics only


def test_data_mcq_needs_qtype_and_focus():
    with pytest.raises(DataError, match="no field 'qtype'"):
        make_items([{"question": "Q?", "answer": "A.", "focus": "f"}])


# ---------------------------------------------------------------------------------------------
# eval.mcq in a job


def _job_file(tmp_path: Path, mcq: str, **eval_keys) -> Path:
    job = tiny_job("mcq", test_rows=2, eval={**QUIET_EVAL, "every": 1, "zero_shot": True, "mcq": mcq, **eval_keys})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**job, "workspace": str(tmp_path / "ws")}))
    return path


def test_a_job_with_eval_mcq_records_mcq_accuracy_each_evaluation(tmp_path):
    write_jsonl(tmp_path / "items.jsonl", [item.to_json() for item in ITEMS])
    cfg = load_config(_job_file(tmp_path, "items.jsonl", mcq_max_items=3, heldout_loss=True))  # relative to the YAML file
    assert cfg.eval.mcq == str(tmp_path / "items.jsonl")
    mcq_io._cached.cache_clear()
    run = run_job(cfg)
    evals = [r["eval"] for r in read_jsonl(run.metrics_file) if "eval" in r]
    assert len(evals) == 3  # zero-shot, rounds 1 and 2
    assert all(KEY_MCQ_ACCURACY in e and e[KEY_MCQ_ACCURACY] in (0, 1 / 3, 2 / 3, 1) for e in evals)
    assert mcq_io._cached.cache_info().misses == 1  # the file was read once, not every round
    for name, ev in (("item_scores_zero_shot.json", evals[0]), ("item_scores.json", evals[-1])):
        items = json.loads((run.path / name).read_text())  # per item, for paired intervals
        assert [r["question"] for r in items["mcq"]] == [it.question for it in ITEMS[:3]]
        assert sum(r["chosen"] == r["answer"] for r in items["mcq"]) / 3 == ev[KEY_MCQ_ACCURACY]
        assert len(items["heldout"]) == 2
        pooled = sum(r["nll"] for r in items["heldout"]) / sum(r["tokens"] for r in items["heldout"])
        assert pooled == pytest.approx(ev["heldout_loss"], rel=1e-6)


def test_eval_mcq_file_problems_are_config_errors_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"eval\.mcq.*multiple-choice file not found"):
        load_config(_job_file(tmp_path, "missing.jsonl"))
    write_jsonl(tmp_path / "bad.jsonl", [ITEMS[0].to_json(), {"question": "Q?", "options": ["a", "b"], "answer": 2}])
    with pytest.raises(ConfigError, match=r"eval\.mcq.*bad.jsonl:2: 'answer' must be an integer in 0..1"):
        load_config(_job_file(tmp_path, "bad.jsonl"))
