"""FFA-LoRA: A frozen at its seeded initialisation, only B travels, and FedAvg is exact on B·A."""

from __future__ import annotations

import torch

from fedpeft.adapters import get_trainable_state
from fedpeft.aggregators import aggregate, build_aggregator
from fedpeft.config import validate_tree
from fedpeft.io_utils import read_jsonl
from fedpeft.simulation import run_job
from fedpeft.state import ClientUpdate
from fedpeft.worker import build_worker
from tiny_jobs import tiny_job


def test_only_b_is_trainable_and_a_is_the_seeded_lora_init(tmp_path):
    lora = build_worker(validate_tree({**tiny_job("l"), "peft": {"method": "lora", "r": 2}}), "cpu")
    ffa = build_worker(validate_tree({**tiny_job("f"), "peft": {"method": "ffa_lora", "r": 2}}), "cpu")
    lora_state, ffa_state = get_trainable_state(lora.model), get_trainable_state(ffa.model)
    assert ffa_state and all(".lora_B." in k for k in ffa_state)
    assert set(ffa_state) == {k for k in lora_state if ".lora_B." in k}
    a_lora = {n: p for n, p in lora.model.named_parameters() if ".lora_A." in n}
    a_ffa = {n: p for n, p in ffa.model.named_parameters() if ".lora_A." in n}
    assert a_ffa.keys() == a_lora.keys() and all(torch.equal(a_ffa[n], a_lora[n]) for n in a_lora)  # same seed


def test_fedavg_of_b_is_the_exact_mean_of_the_products_when_a_is_shared():
    a = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])  # (r=2, in=3), frozen and shared
    b1, b2 = torch.tensor([[1.0, 2.0], [0.0, 1.0]]), torch.tensor([[3.0, 0.0], [1.0, -1.0]])  # (out=2, r=2)
    mean_b = aggregate(build_aggregator("fedavg", {}), {"B": torch.zeros(2, 2)},
                       [ClientUpdate("x", {"B": b1}, 1), ClientUpdate("y", {"B": b2}, 3)])["B"]
    assert torch.allclose(mean_b @ a, (1 * b1 @ a + 3 * b2 @ a) / 4)
    # separately averaged LoRA factors (A trained too) would not be exact:
    a2 = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert not torch.allclose(mean_b @ ((a + 3 * a2) / 4), (b1 @ a + 3 * b2 @ a2) / 4)


def test_an_ffa_lora_run_sends_half_of_loras_bytes_and_keeps_a_fixed(tmp_path):
    def run(method):
        job = {**tiny_job(method), "peft": {"method": method, "r": 2}, "workspace": str(tmp_path)}
        return run_job(validate_tree(job))
    lora, ffa = run("lora"), run("ffa_lora")
    up = [r["bytes_up"] for r in read_jsonl(ffa.metrics_file) if r["event"] == "round"]
    lora_up = [r["bytes_up"] for r in read_jsonl(lora.metrics_file) if r["event"] == "round"]
    assert up[0] < lora_up[0] * 0.75  # tiny llama: B is (out x r), A (r x in); MLP shapes differ
    from safetensors.torch import load_file
    saved = load_file(str(ffa.adapter_dir / "adapter_model.safetensors"))
    init = build_worker(validate_tree({**tiny_job("x"), "peft": {"method": "ffa_lora", "r": 2}}), "cpu").model
    a_init = {n: p for n, p in init.named_parameters() if ".lora_A." in n}
    assert sum(".lora_A." in k for k in saved) == len(a_init) > 0
    for name, value in saved.items():
        if ".lora_A." in name:  # the saved adapter's A is the untouched initialisation
            match = [p for n, p in a_init.items() if n.replace(".default", "").endswith(name.split("base_model.model.")[-1])]
            assert len(match) == 1 and torch.equal(match[0], value), name
