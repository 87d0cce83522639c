"""Helpers to write Ianvs-format benchmark jobs (three YAML files) for the tiny model.

Imported by the tests beside it (pytest puts this folder on sys.path).
"""

from __future__ import annotations

from pathlib import Path

import yaml


def tiny_ianvs_files(tmp_path: Path, workspace: Path | None = None) -> dict[str, dict]:
    """The three files of a tiny two-value grid (peft_method: lora, ptuning) with every baseline."""
    job = {"benchmarkingjob": {
        "name": "tiny-bench",
        "workspace": str(workspace or tmp_path / "ws"),
        "testenv": "./testenv/testenv.yaml",
        "test_object": {"type": "algorithms", "algorithms": [{"name": "fedavgm-peft", "url": "./algorithm/algorithm.yaml"}]},
        "rank": {
            "sort_by": [{"heldout_loss": "ascend"}, {"rougel_metric": "descend"}],
            "visualization": {"mode": "selected_only", "method": "print_table"},
            "selected_dataitem": {"paradigms": ["all"], "modules": ["all"],
                                  "hyperparameters": ["basemodel-peft_method", "aggregation-beta"],
                                  "metrics": ["rouge1_metric", "rougel_metric", "heldout_loss", "pct_of_centralized"]},
            "save_mode": "selected_and_all",
        },
        "fedpeft": {
            "baselines": ["zero_shot", "local_only", "centralized"],
            "config": {"seed": 3,
                       "data": {"test_ratio": 0.1, "split_by": "focus", "max_seq_len": 48, "max_test_samples": 2,
                                "max_train_samples": 24},
                       "train": {"max_steps": 1},
                       "eval": {"every": 1, "max_new_tokens": 3, "batch_size": 2}},
            "peft": {"lora": {"r": 2}, "ptuning": {"num_virtual_tokens": 2, "encoder_hidden_size": 8}},
        },
    }}
    testenv = {"testenv": {
        "backend": "TORCH",
        "dataset": {"train_data": "builtin:sample"},
        "model_eval": {"model_metric": {"name": "rougel_metric"}, "threshold": 0, "operator": ">"},
        "metrics": [{"name": "rouge1_metric"}, {"name": "rougel_metric"}],
        "round": 2, "gpu_num": 0, "client_number": 2, "if_mode_llm": True,
    }}
    algorithm = {"algorithm": {
        "paradigm_type": "federatedlearning",
        "fl_data_setting": {"train_ratio": 1.0, "splitting_method": "default", "label_data_ratio": 1.0},
        "modules": [
            {"type": "basemodel", "name": "fedllm-peft", "hyperparameters": [
                {"batch_size": {"values": [2]}},
                {"learning_rate": {"values": [5.0e-3]}},
                {"model_name": {"values": ["tiny-random-llama"]}},
                {"save_dir": {"values": ["./save_model"]}},
                {"peft_method": {"values": ["lora", "ptuning"]}},
            ]},
            {"type": "aggregation", "name": "FedAvgM-PEFT",
             "hyperparameters": [{"beta": {"values": [0.5]}}, {"server_lr": {"values": [1.0]}}]},
        ],
    }}
    return {"benchmarkingjob.yaml": job, "testenv/testenv.yaml": testenv, "algorithm/algorithm.yaml": algorithm}


def write_files(root: Path, files: dict[str, dict]) -> Path:
    """Write ``{relative path: tree}``; return the benchmarkingjob.yaml path."""
    for rel, tree in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return root / "benchmarkingjob.yaml"
