"""Ianvs and native benchmark files -> test cases (no model is run here)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from fedpeft.benchmark.plan import load_plan
from fedpeft.errors import ConfigError
from fedpeft.metrics import METRICS

from benchmark_jobs import write_files

REPO = Path(__file__).resolve().parents[2]


def line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_shipped_ianvs_example_maps_onto_job_configs():
    plan = load_plan(REPO / "examples/ianvs/benchmarkingjob.yaml")
    assert [(c.algorithm, c.cfg.peft.method, c.cfg.federation.aggregation.name) for c in plan.cases] == [
        ("fedavg-peft", "lora", "fedavg"), ("fedavg-peft", "ptuning", "fedavg"),
        ("fedavgm-peft", "lora", "fedavgm"), ("fedavgm-peft", "ptuning", "fedavgm")]
    lora, ptuning, m_lora, _ = (c.cfg for c in plan.cases)
    assert lora.peft.params == {"r": 16, "alpha": 32} and ptuning.peft.params["num_virtual_tokens"] == 20
    assert m_lora.federation.aggregation.params == {"beta": 0.7, "server_lr": 1.0}
    assert lora.model.name == "smollm2-135m-instruct" and lora.train.learning_rate == 1e-3
    assert (lora.federation.rounds, lora.federation.num_clients, lora.data.max_seq_len) == (2, 4, 256)
    assert Path(lora.data.train).resolve() == (REPO.parent / "shared/datasets/medquad/train.jsonl").resolve()
    assert [(m.column, m.key) for m in plan.metrics] == [
        ("rouge1_metric", "rouge1"), ("rouge2_metric", "rouge2"), ("rougel_metric", "rougeL"), ("bleu4_metric", "bleu4")]
    assert plan.baselines == ["zero_shot", "local_only", "centralized"]
    assert plan.cases[2].hyperparameters["aggregation-beta"] == 0.7
    assert plan.cases[0].modules == {"basemodel": "fedllm-peft", "aggregation": "FedAvg-PEFT"}
    assert plan.job_dir == Path("./workspace/ianvs/fedllm-peft-medquad")


def test_native_grid_and_ianvs_example_give_the_same_test_cases():
    def comparable(cfg) -> dict:
        tree = cfg.model_dump(mode="json")
        for key in ("job", "workspace", "run_id"):
            tree.pop(key)
        tree["model"].pop("devices")  # Ianvs: gpu_num; native: auto
        tree["data"]["train"] = str(Path(tree["data"]["train"]).resolve())
        tree["data"]["test"] = str(Path(tree["data"]["test"]).resolve())
        return tree

    ianvs = load_plan(REPO / "examples/ianvs/benchmarkingjob.yaml")
    native = load_plan(REPO / "configs/benchmark-medquad.yaml")
    assert [comparable(c.cfg) for c in ianvs.cases] == [comparable(c.cfg) for c in native.cases]
    assert ianvs.baselines == native.baselines
    assert [c.algorithm for c in native.cases] == ["fedavg-lora", "fedavg-ptuning", "fedavgm-lora", "fedavgm-ptuning"]
    assert native.cases[3].hyperparameters == {"federation.aggregation.name": "fedavgm",
                                               "federation.aggregation.beta": 0.7,
                                               "federation.aggregation.server_lr": 1.0, "peft.method": "ptuning",
                                               "peft.num_virtual_tokens": 20, "peft.encoder_hidden_size": 128}


def test_every_hyperparameter_list_expands_into_the_cartesian_product(tmp_path, ianvs_files):
    hps = ianvs_files["algorithm/algorithm.yaml"]["algorithm"]["modules"][0]["hyperparameters"]
    hps[1] = {"learning_rate": {"values": [1.0e-3, 1.0e-2]}}
    hps.append({"data.max_seq_len": {"values": [32, 64]}})  # a dotted job key is a hyperparameter too
    plan = load_plan(write_files(tmp_path, ianvs_files))
    got = [(c.cfg.train.learning_rate, c.cfg.peft.method, c.cfg.data.max_seq_len) for c in plan.cases]
    assert got == [(lr, m, n) for lr in (1e-3, 1e-2) for m in ("lora", "ptuning") for n in (32, 64)]
    assert plan.hyperparameter_columns() == [
        "basemodel-batch_size", "basemodel-learning_rate", "basemodel-model_name", "basemodel-save_dir",
        "basemodel-peft_method", "basemodel-data.max_seq_len", "aggregation-beta", "aggregation-server_lr"]
    assert plan.cases[0].cfg.peft.params == {"r": 2} and plan.cases[2].cfg.peft.params["num_virtual_tokens"] == 2
    assert plan.cases[0].cfg.model.devices == "cpu"  # gpu_num: 0


def test_misspelt_keys_name_the_file_line_key_and_closest_valid_key(tmp_path, ianvs_files):
    env_tree = ianvs_files["testenv/testenv.yaml"]["testenv"]
    env_tree["client_numbr"] = env_tree.pop("client_number")
    algo = ianvs_files["algorithm/algorithm.yaml"]["algorithm"]
    algo["modules"][0]["hyperparameters"][1] = {"lerning_rate": {"values": [1e-3]}}
    algo["modules"][1]["hyperparameters"][0] = {"betta": {"values": [0.5]}}
    job = write_files(tmp_path, ianvs_files)
    with pytest.raises(ConfigError) as err:
        load_plan(job)
    msg = str(err.value)
    env, alg = tmp_path / "testenv/testenv.yaml", tmp_path / "algorithm/algorithm.yaml"
    assert f"{env}:{line_of(env, 'client_numbr')}: testenv.client_numbr: unknown key 'client_numbr'; " \
           "did you mean 'client_number'?" in msg
    assert "testenv.client_number: Field required" in msg  # the misspelling leaves it unset
    assert f"{alg}:{line_of(alg, 'lerning_rate')}:" in msg and "did you mean 'learning_rate'?" in msg
    assert f"{alg}:{line_of(alg, 'betta')}:" in msg and "did you mean 'beta'?" in msg


def test_misspelt_key_in_benchmarkingjob(tmp_path, ianvs_files):
    ianvs_files["benchmarkingjob.yaml"]["benchmarkingjob"]["rank"]["sortby"] = []
    ianvs_files["benchmarkingjob.yaml"]["benchmarkingjob"]["fedpeft"]["baselines"].append("centralised")
    job = write_files(tmp_path, ianvs_files)
    with pytest.raises(ConfigError) as err:
        load_plan(job)
    msg = str(err.value)
    assert f"{job}:{line_of(job, 'sortby')}: benchmarkingjob.rank.sortby: unknown key 'sortby'; " \
           "did you mean 'sort_by'?" in msg
    assert "unknown baseline 'centralised'; did you mean 'centralized'?" in msg


def test_rank_names_and_fedpeft_section_are_checked(tmp_path, ianvs_files):
    job_tree = ianvs_files["benchmarkingjob.yaml"]["benchmarkingjob"]
    job_tree["rank"]["sort_by"] = [{"rougel": "descend"}]
    job_tree["rank"]["selected_dataitem"]["hyperparameters"] = ["basemodel-peft"]
    job_tree["fedpeft"]["config"]["federation"] = {"rounds": 5}  # testenv's `round` says that
    job_tree["fedpeft"]["config"]["eval"]["max_new_tokns"] = 3
    ianvs_files["testenv/testenv.yaml"]["testenv"]["metrics"].append({"name": "rouge_l"})
    with pytest.raises(ConfigError) as err:
        load_plan(write_files(tmp_path, ianvs_files))
    msg = str(err.value)
    assert "'federation.rounds' is set by the Ianvs files" in msg
    assert "benchmarkingjob.fedpeft.config.eval.max_new_tokns: unknown key 'max_new_tokns'; " \
           "did you mean 'max_new_tokens'?" in msg
    job_tree["fedpeft"]["config"] = {}
    with pytest.raises(ConfigError) as err:
        load_plan(write_files(tmp_path, ianvs_files))
    msg = str(err.value)
    assert "unknown metric 'rouge_l'; did you mean 'rougel_metric'?" in msg
    ianvs_files["testenv/testenv.yaml"]["testenv"]["metrics"].pop()
    with pytest.raises(ConfigError) as err:
        load_plan(write_files(tmp_path, ianvs_files))
    msg = str(err.value)
    assert "cannot sort by 'rougel'; did you mean 'rougel_metric'?" in msg
    assert "unknown hyperparameter 'basemodel-peft'; did you mean 'basemodel-peft_method'?" in msg


def test_unused_keys_are_accepted_and_reported_once(tmp_path, ianvs_files, caplog):
    with caplog.at_level(logging.INFO, logger="fedpeft.benchmark"):
        plan = load_plan(write_files(tmp_path, ianvs_files))
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ignored:")]
    for key in ("testenv.model_eval", "fl_data_setting.train_ratio", "fl_data_setting.splitting_method", "save_dir"):
        assert sum(key in line for line in logged) == 1, key
    assert len(plan.cases) == 2


def test_metric_and_aggregation_urls_load_user_plugins(tmp_path, ianvs_files):
    (tmp_path / "testenv").mkdir()
    (tmp_path / "testenv/exact_match.py").write_text(
        "def exact_match(*, predictions, references):\n"
        "    return sum(p == r for p, r in zip(predictions, references)) / len(references)\n")
    (tmp_path / "algorithm").mkdir()
    (tmp_path / "algorithm/half_avg.py").write_text(
        "class HalfAvg:\n"
        "    def __init__(self, scale: float = 0.5):\n        self.scale = scale\n"
        "    def step(self, g, mean):\n        return {k: g[k] + self.scale * (mean[k] - g[k]) for k in g}\n"
        "    def state_dict(self):\n        return {}\n"
        "    def load_state_dict(self, state):\n        pass\n")
    ianvs_files["benchmarkingjob.yaml"]["benchmarkingjob"]["rank"]["selected_dataitem"]["hyperparameters"] = ["all"]
    ianvs_files["testenv/testenv.yaml"]["testenv"]["metrics"].append({"name": "exact_match", "url": "./exact_match.py"})
    ianvs_files["algorithm/algorithm.yaml"]["algorithm"]["modules"][1] = {
        "type": "aggregation", "name": "HalfAvg", "url": "./half_avg.py", "hyperparameters": [{"scale": {"values": [0.25]}}]}
    plan = load_plan(write_files(tmp_path, ianvs_files))
    metric = plan.metrics[-1]
    assert metric.column == "exact_match" and metric.key.endswith("exact_match.py:exact_match")
    assert METRICS.get(metric.key)(predictions=["a", "b"], references=["a", "c"]) == 0.5
    agg = plan.cases[0].cfg.federation.aggregation
    assert agg.name.endswith("half_avg.py:HalfAvg") and agg.params == {"scale": 0.25}
    ianvs_files["algorithm/algorithm.yaml"]["algorithm"]["modules"][1]["hyperparameters"] = [{"scal": {"values": [1]}}]
    with pytest.raises(ConfigError, match="unknown aggregation hyperparameter 'scal'; did you mean 'scale'"):
        load_plan(write_files(tmp_path, ianvs_files))


def test_native_grid_key_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump({
        "job": "b", "model": {"name": "tiny-random-llama"},
        "grid": {"train.learnig_rate": [1e-3, 1e-2], "peft": [{"method": "lora"}]},
        "baselines": ["zero_shot"], "rank": {"sort_by": [{"rougeL": "descend"}]}}, sort_keys=False))
    with pytest.raises(ConfigError) as err:
        load_plan(path)
    assert f"{path}:{line_of(path, 'learnig_rate')}: grid.train.learnig_rate: 'train.learnig_rate' is not a job " \
           "setting; did you mean 'train.learning_rate'?" in str(err.value)


def test_a_plain_job_is_not_a_benchmark(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"job": "x"}))
    with pytest.raises(ConfigError, match="not a benchmark file"):
        load_plan(path)


def test_a_pure_ianvs_job_evaluates_zero_shot_once_per_setup_as_a_row(tmp_path, ianvs_files):
    from fedpeft.benchmark.runner import plan_jobs

    del ianvs_files["benchmarkingjob.yaml"]["benchmarkingjob"]["fedpeft"]  # as Ianvs writes it
    ianvs_files["benchmarkingjob.yaml"]["benchmarkingjob"]["rank"]["sort_by"] = [{"rougel_metric": "descend"}]
    ianvs_files["benchmarkingjob.yaml"]["benchmarkingjob"]["rank"]["selected_dataitem"]["metrics"] = ["rougel_metric"]
    plan = load_plan(write_files(tmp_path, ianvs_files))
    assert plan.baselines == ["zero_shot"]
    jobs = plan_jobs(plan)
    assert [j.kind for j in jobs] == ["zero_shot", "federated", "federated"]  # lora and ptuning share it
    assert [j.cfg.eval.zero_shot for j in jobs[1:]] == [False, False]  # not again at each case's round 0
    ianvs_files["benchmarkingjob.yaml"]["benchmarkingjob"]["fedpeft"] = {"baselines": []}
    assert load_plan(write_files(tmp_path, ianvs_files)).baselines == []
