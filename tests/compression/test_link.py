"""Compression in the round: bytes reported are the payload's, codecs change the run a little,
top-k's residuals survive a resume, and a bad combination is a config error."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fedpeft.compression import ErrorFeedback, build_codec
from fedpeft.compression.link import Link
from fedpeft.config import validate_tree
from fedpeft.constants import CHECKPOINT_SERVER_OPT_FILE
from fedpeft.errors import ConfigError
from fedpeft.io_utils import read_jsonl
from fedpeft.simulation import run_job
from tiny_jobs import tiny_job


def _job(tmp_path, run_id: str, rounds: int = 2, **compression) -> dict:
    job = tiny_job("link", seed=4, clients=2)
    job["federation"] = {**job["federation"], "rounds": rounds, "compression": compression}
    job["train"] = {**job["train"], "max_steps": 2}
    return {**job, "workspace": str(tmp_path), "run_id": run_id}


def _final(run, rnd: int) -> dict[str, torch.Tensor]:
    return load_file(str(run.path / "checkpoints" / f"round-{rnd:04d}" / "global_state.safetensors"))


def _rounds(run) -> list[dict]:
    return [r for r in read_jsonl(run.metrics_file) if r["event"] == "round"]


def test_bytes_per_round_are_the_payload_bytes(tmp_path):
    plain = run_job(validate_tree(_job(tmp_path, "plain")))
    nf4 = run_job(validate_tree(_job(tmp_path, "nf4", up={"name": "nf4"}, down={"name": "fp16"})))
    fp32 = _rounds(plain)[0]
    small = _rounds(nf4)[0]
    n = sum(v.numel() for v in _final(plain, 1).values())
    assert fp32["bytes_up"] == 2 * 4 * n and fp32["bytes_down"] == 2 * 4 * n  # 2 clients
    tensors = _final(plain, 1)
    nf4_bytes = sum((v.numel() + 1) // 2 + 4 * -(-v.numel() // 64) for v in tensors.values())
    assert small["bytes_up"] == 2 * nf4_bytes and small["bytes_down"] == 2 * 2 * n
    assert fp32["bytes_up"] / small["bytes_up"] > 7
    a, b = _final(plain, 2), _final(nf4, 2)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the codec was applied
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 0.05  # and kept the update close


def test_top_k_residuals_are_checkpointed_so_a_resumed_run_is_exact(tmp_path):
    straight = run_job(validate_tree(_job(tmp_path, "straight", rounds=3, up={"name": "topk", "fraction": 0.05})))
    run = run_job(validate_tree(_job(tmp_path, "resumed", rounds=2, up={"name": "topk", "fraction": 0.05})))
    tree = yaml.safe_load(run.config_file.read_text())
    tree["federation"]["rounds"] = 3
    run.config_file.write_text(yaml.safe_dump(tree))
    run_job(None, resume=run.path, allow_config_change=("federation.rounds",))
    a, b = _final(straight, 3), _final(run, 3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ckpt = torch.load(run.path / "checkpoints" / "round-0003" / CHECKPOINT_SERVER_OPT_FILE, weights_only=False)
    residuals = ckpt["server"]["__client_pool__"]
    assert set(residuals) == {"client-0", "client-1"}
    assert all(float(v.abs().sum()) > 0 for r in residuals.values() for v in r.values())  # what was not sent


def test_lossless_up_sends_the_state_and_lossy_up_a_delta_rebuilt_on_the_exact_global():
    g = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    trained = {"w": torch.tensor([1.5, 2.0, 2.0, 4.25])}
    plain = Link(build_codec("none"), build_codec("none"))
    assert torch.equal(plain.receive_update(plain.send_update(g, trained, None), g)["w"], trained["w"])
    topk = Link(build_codec("none"), build_codec("topk", {"fraction": 0.5}))
    feedback = ErrorFeedback()
    got = topk.receive_update(topk.send_update(g, trained, feedback), g)
    assert torch.equal(got["w"], torch.tensor([1.5, 2.0, 2.0, 4.0]))  # deltas 0.5 and -1 sent, 0.25 kept
    assert torch.equal(feedback.residual["w"], torch.tensor([0.0, 0.0, 0.0, 0.25]))


def test_top_k_down_and_an_unknown_codec_are_config_errors(tmp_path):
    with pytest.raises(ConfigError) as e:
        validate_tree(_job(tmp_path, "x", up={"name": "nf5"}, down={"name": "topk"}))
    text = str(e.value)
    assert "federation.compression.up.name" in text and "nf4" in text  # did you mean
    assert "federation.compression.down.name: 'topk' only compresses updates" in text
