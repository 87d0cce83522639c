"""Metric files written the Ianvs way (tests/benchmark/ianvs_plugins/) through fedpeft's Ianvs loader.

The seed's four metric files are re-typed there unchanged. They call Hugging Face
``evaluate.load(...)``, which downloads the metric's code; the ``hf_evaluate`` fixture stands in
for that package, computing BLEU as ``evaluate`` does (tests/hf_bleu.py) and ROUGE as the mean F1
of ``rouge_score`` (``evaluate``'s default aggregator reports the median of bootstrap means instead).
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from benchmark_jobs import write_files
from fedpeft.benchmark.plan import load_plan
from fedpeft.cli import main
from fedpeft.errors import ConfigError
from fedpeft.metrics import METRICS, compute_metrics
from hf_bleu import hf_bleu

PLUGINS = Path(__file__).parent / "ianvs_plugins"
SEED = ("rouge1", "rouge2", "rougel", "bleu4")
# A prediction half as long as its reference: BLEU's brevity penalty and a length ratio are
# different when the two are swapped.
SHORT, LONG = "the patient should drink", "the patient should drink more water every day"


class _Bleu:
    def compute(self, predictions: list[str], references: list[list[str]]) -> dict:
        if not "".join(predictions).strip():  # evaluate's own bleu raises ZeroDivisionError here
            return {"bleu": 0.0}
        return {"bleu": hf_bleu(predictions, [r[0] for r in references])}


class _Rouge:
    def compute(self, predictions: list[str], references: list[str], use_stemmer: bool = False) -> dict:
        types_ = ["rouge1", "rouge2", "rougeL"]
        scorer = rouge_scorer.RougeScorer(types_, use_stemmer=use_stemmer)
        scores = [scorer.score(target=r, prediction=p) for p, r in zip(predictions, references)]
        return {t: sum(s[t].fmeasure for s in scores) / len(scores) for t in types_}


@pytest.fixture
def hf_evaluate(monkeypatch: pytest.MonkeyPatch) -> None:
    """An ``evaluate`` package whose ``load("bleu" | "rouge")`` computes offline."""
    module = types.ModuleType("evaluate")
    module.load = lambda name: {"bleu": _Bleu, "rouge": _Rouge}[name]()
    monkeypatch.setitem(sys.modules, "evaluate", module)


def _job(tmp_path: Path, ianvs_files: dict, metrics: list[dict]) -> Path:
    """The tiny Ianvs job with ``metrics`` in testenv.yaml and the plugin files beside it."""
    env = ianvs_files["testenv/testenv.yaml"]["testenv"]
    named = {m["name"] for m in metrics}
    env["metrics"] = [m for m in env["metrics"] if m["name"] not in named] + metrics  # rouge1, rougel: built in
    job = write_files(tmp_path, ianvs_files)
    for plugin in PLUGINS.glob("*.py"):
        shutil.copy(plugin, tmp_path / "testenv" / plugin.name)
    return job


def _stand_ins_left() -> list[str]:
    return [name for name in sys.modules if name.split(".")[0] in ("sedna", "core")]


def test_seed_metric_files_run_unchanged_and_win_over_the_built_ins(tmp_path, ianvs_files, hf_evaluate):
    seed = [{"name": f"{m}_metric", "url": f"./{m}_metric.py"} for m in SEED]
    plan = load_plan(_job(tmp_path, ianvs_files, seed))
    files = [m.key for m in plan.metrics]
    assert files == [f"{tmp_path / 'testenv' / m['name']}.py:{m['name']}" for m in seed]  # not rouge1, ..., bleu4
    assert _stand_ins_left() == []
    predictions, references = [SHORT, "drink water"], [LONG, "drink more water"]
    scores = compute_metrics(files, predictions=predictions, references=references)
    builtin = compute_metrics(["rouge1", "rouge2", "rougeL", "bleu4"], predictions=predictions, references=references)
    assert list(scores.values()) == pytest.approx([round(v, 4) for v in builtin.values()], abs=1e-12)
    swapped = compute_metrics(["bleu4"], predictions=references, references=predictions)["bleu4"]
    assert abs(round(swapped, 4) - scores[files[-1]]) > 0.01  # the seed's (y_pred, y_true) was honoured


@pytest.mark.parametrize("plugin", ["length_ratio_pred_first.py", "length_ratio_true_first.py",
                                    "length_ratio_positional.py", "length_ratio_keywords.py"])
def test_an_asymmetric_metric_gets_predictions_and_references_the_right_way_round(plugin, tmp_path, ianvs_files):
    plan = load_plan(_job(tmp_path, ianvs_files, [{"name": "length_ratio", "url": f"./{plugin}"}]))
    metric = METRICS.get(plan.metrics[-1].key)
    assert metric(predictions=[SHORT], references=[LONG]) == pytest.approx(4 / 8)  # swapped: 2.0
    assert metric(predictions={"q1": SHORT, "q2": SHORT}, references={"q2": LONG, "q1": LONG}) == pytest.approx(0.5)
    assert _stand_ins_left() == []


def test_ianvs_logger_and_class_factory_work_while_the_file_loads(tmp_path, ianvs_files, caplog):
    plan = load_plan(_job(tmp_path, ianvs_files, [{"name": "length_ratio", "url": "./length_ratio_pred_first.py"}]))
    module = sys.modules[METRICS.get(plan.metrics[-1].key).__wrapped__.__module__]
    assert module.ClassFactory.get_cls(module.ClassType.GENERAL, "length_ratio") is module.length_ratio
    with caplog.at_level("INFO", logger="ianvs"):
        METRICS.get(plan.metrics[-1].key)(predictions=["a"], references=["b"])
    assert "length_ratio of 1 answers" in caplog.text


def test_an_installed_sedna_is_used_instead_of_the_stand_in(tmp_path, ianvs_files, monkeypatch):
    real = tmp_path / "site" / "sedna" / "common"
    real.mkdir(parents=True)
    (real.parent / "__init__.py").write_text("")
    (real / "__init__.py").write_text("")
    (real / "class_factory.py").write_text(_SEDNA_CLASS_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    try:
        plan = load_plan(_job(tmp_path, ianvs_files, [{"name": "length_ratio", "url": "./length_ratio_true_first.py"}]))
        factory = sys.modules["sedna.common.class_factory"].ClassFactory
        assert factory.REAL and factory.__registry__["general"]["length_ratio"].__name__ == "ratio_of_lengths"
        assert METRICS.get(plan.metrics[-1].key)(predictions=[SHORT], references=[LONG]) == pytest.approx(0.5)
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == "sedna"]:
            del sys.modules[name]


_SEDNA_CLASS_FACTORY = '''
class ClassType:
    GENERAL = "general"


class ClassFactory:
    REAL = True
    __registry__ = {}

    @classmethod
    def register(cls, type_name=ClassType.GENERAL, alias=None):
        def wrapper(t_cls):
            cls.__registry__.setdefault(type_name, {})[alias or t_cls.__name__] = t_cls
            return t_cls
        return wrapper
'''


def test_a_plugin_that_fails_to_import_reports_its_own_error_every_time(tmp_path, ianvs_files, monkeypatch):
    monkeypatch.setitem(sys.modules, "evaluate", None)  # HF evaluate absent (lm-eval installs it)
    job = _job(tmp_path, ianvs_files, [{"name": "bleu4_metric", "url": "./bleu4_metric.py"}])  # no evaluate
    env, plugin = tmp_path / "testenv/testenv.yaml", tmp_path / "testenv/bleu4_metric.py"
    for _ in range(2):
        with pytest.raises(ConfigError) as err:
            load_plan(job)
        assert f"{env}:{_line(env, 'bleu4_metric.py')}: testenv.metrics.2.url: plugin '{plugin}:bleu4_metric' " \
               "failed in import: ModuleNotFoundError: import of evaluate halted; None in sys.modules " \
               f"({plugin}:{_line(plugin, 'from evaluate')}: from evaluate import load as load_metric)" in str(err.value)
    for _ in range(2):  # what every test case of a run would see
        with pytest.raises(ModuleNotFoundError, match="evaluate"):
            METRICS.get(f"{plugin}:bleu4_metric")
    assert _stand_ins_left() == []


def _line(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


@pytest.mark.parametrize("command", [["validate"], ["run", "--dry-run"], ["benchmark", "--dry-run"]])
def test_validate_and_dry_run_report_a_missing_file_a_wrong_signature_and_a_misspelt_key_together(
        command, tmp_path, ianvs_files, capsys):
    env_tree = ianvs_files["testenv/testenv.yaml"]["testenv"]
    env_tree["client_numbr"] = env_tree.pop("client_number")
    job = _job(tmp_path, ianvs_files, [{"name": "bleu4_metric", "url": "./bleu4_metrc.py"},
                                       {"name": "half_metric", "url": "./wrong_signature.py"}])
    assert main([command[0], str(job), *command[1:]]) == 2
    err = capsys.readouterr().err
    env, wrong = tmp_path / "testenv/testenv.yaml", tmp_path / "testenv/wrong_signature.py"
    assert f"{env}:{_line(env, 'bleu4_metrc.py')}: testenv.metrics.2.url: metric file not found: " \
           "'./bleu4_metrc.py' is neither beside testenv.yaml" in err
    assert f"{env}:{_line(env, 'wrong_signature.py')}: testenv.metrics.3.url: metric plugin '{wrong}:half_metric' " \
           f"({wrong}:{_line(wrong, 'half_metric')}) has the wrong signature half_metric(y_pred): it names " \
           "predictions (y_pred) but no parameter for the references; expected fn(y_pred, y_true, **kwargs) or " \
           "fn(*, predictions, references)" in err
    assert f"{env}:{_line(env, 'client_numbr')}: testenv.client_numbr: unknown key 'client_numbr'; " \
           "did you mean 'client_number'?" in err


def test_the_seed_aggregation_files_are_used_with_their_hyperparameters(tmp_path, ianvs_files):
    ianvs_files["algorithm/algorithm.yaml"]["algorithm"]["modules"][1]["url"] = "../testenv/FedAvgM-PEFT.py"
    plan = load_plan(_job(tmp_path, ianvs_files, []))
    agg = plan.cases[0].cfg.federation.aggregation
    assert agg.name == f"{tmp_path / 'testenv/FedAvgM-PEFT.py'}:FedAvgM-PEFT"  # not fedpeft's fedavgm
    assert agg.params == {"beta": 0.5, "server_lr": 1.0}
    assert plan.cases[0].modules["aggregation"] == "FedAvgM-PEFT"
    ianvs_files["algorithm/algorithm.yaml"]["algorithm"]["modules"][1]["hyperparameters"] = [{"momentum": {"values": [1]}}]
    with pytest.raises(ConfigError, match="unknown aggregation hyperparameter 'momentum'.*Valid: beta, server_lr"):
        load_plan(_job(tmp_path, ianvs_files, []))


def test_a_job_of_seed_files_runs_through_fedpeft_benchmark(tmp_path, ianvs_files, hf_evaluate):
    job_tree = ianvs_files["benchmarkingjob.yaml"]["benchmarkingjob"]
    job_tree["fedpeft"]["baselines"] = []
    job_tree["rank"]["selected_dataitem"]["metrics"] = ["rouge1_metric", "bleu4_metric", "length_ratio"]
    modules = ianvs_files["algorithm/algorithm.yaml"]["algorithm"]["modules"]
    modules[0]["hyperparameters"][-1] = {"peft_method": {"values": ["lora"]}}
    modules[1]["url"] = "../testenv/FedAvgM-PEFT.py"
    seed = [{"name": f"{m}_metric", "url": f"./{m}_metric.py"} for m in SEED]
    path = _job(tmp_path, ianvs_files, seed + [{"name": "length_ratio", "url": "./length_ratio_pred_first.py"}])
    assert main(["benchmark", str(path)]) == 0
    (case,) = (tmp_path / "ws/tiny-bench/fedavgm-peft").iterdir()
    record = json.loads((case / "testcase.json").read_text())
    rows = [json.loads(line) for line in (case / "predictions.jsonl").read_text().splitlines()]
    predictions, references = [r["prediction"] for r in rows], [r["reference"] for r in rows]
    words = sum(len(p.split()) for p in predictions) / sum(len(r.split()) for r in references)
    # The tiny random model's answers are short or empty: swapped, the ratio would be far above 1
    # (or divide by zero), and the run would fail or record it.
    assert record["metrics"]["length_ratio"] == pytest.approx(words) and words < 0.5
    builtin = compute_metrics(["rouge1", "bleu4"], predictions=predictions, references=references)
    assert record["metrics"]["rouge1_metric"] == round(builtin["rouge1"], 4)
    assert record["metrics"]["bleu4_metric"] == round(builtin["bleu4"], 4)
