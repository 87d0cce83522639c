"""The in-process federated run: sample -> train clients -> aggregate -> evaluate -> checkpoint.

Every client runs through the :class:`~fedpeft.scheduler.DeviceScheduler` (one base model per
device, adapters swapped in and out). The trainer and aggregators are the same ones the Flower
deployment uses.
"""

from __future__ import annotations

import logging
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
from peft import PeftModel

from fedpeft.adapters import get_trainable_state, num_parameters, set_trainable_state, state_nbytes
from fedpeft.aggregators import build_aggregator
from fedpeft.checkpoint import load_latest_checkpoint, save_checkpoint
from fedpeft.config import JobConfig, load_config
from fedpeft.constants import CONFIG_FILE, EVENT_EVAL, EVENT_ROUND, KEY_BYTES_DOWN, KEY_BYTES_UP, KEY_EVAL
from fedpeft.data.federated import FederatedData, prepare_data
from fedpeft.data.prompts import TokenizedExample, tokenize_examples
from fedpeft.evaluation import evaluate
from fedpeft.models import load_base_model, resolve_devices
from fedpeft.peft_methods import build_peft_method, wrap_model
from fedpeft.adapters import save_adapter
from fedpeft.run_dir import RunDir
from fedpeft.scheduler import DeviceScheduler, Task
from fedpeft.trainer import fit
from fedpeft.state import ClientUpdate, State

log = logging.getLogger(__name__)


@dataclass
class Worker:
    """What one device's worker holds for the whole run: ONE PEFT-wrapped base model."""

    model: PeftModel
    tokenizer: Any
    device: str


def build_worker(cfg: JobConfig, device: str) -> Worker:
    """Load the base model on ``device`` and wrap it (same seeded adapter init on every device)."""
    model, tok = load_base_model(cfg.model, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        peft_model = wrap_model(model, build_peft_method(cfg.peft.method, cfg.peft.params))
    peft_model.to(device)
    peft_model.eval()
    return Worker(peft_model, tok, device)


def sample_clients(cfg: JobConfig, rnd: int, client_ids: list[str]) -> list[str]:
    """The clients of round ``rnd``: a seeded sample, derived from (seed, round) alone."""
    k = cfg.sampled_per_round()
    if k >= len(client_ids):
        return list(client_ids)
    picked = random.Random(f"{cfg.seed}-{rnd}").sample(range(len(client_ids)), k)
    return [client_ids[i] for i in sorted(picked)]


def client_seed(cfg: JobConfig, rnd: int, index: int) -> int:
    """Seed of one client's local training in one round (replayable on resume)."""
    return cfg.seed * 1_000_003 + rnd * 1_009 + index


@contextmanager
def base_view(model: PeftModel) -> Iterator[torch.nn.Module]:
    """The model with its adapter disabled (zero-shot evaluation)."""
    if model.peft_config[model.active_adapter].is_prompt_learning:
        yield model.get_base_model()
    else:
        with model.disable_adapter():
            yield model


def evaluate_global(worker: Worker, state: State | None, cfg: JobConfig, test: list[dict]) -> tuple[dict, list[dict]]:
    kwargs = dict(system_prompt=cfg.data.system_prompt, max_seq_len=cfg.data.max_seq_len)
    if state is None:  # zero-shot: the base model alone
        with base_view(worker.model) as model:
            eval_cfg = cfg.eval.model_copy(update={"merge_lora": False})
            return evaluate(model, worker.tokenizer, test, eval_cfg, **kwargs)
    set_trainable_state(worker.model, state)
    return evaluate(worker.model, worker.tokenizer, test, cfg.eval, **kwargs)


def train_round(
    sched: DeviceScheduler[Worker], cfg: JobConfig, rnd: int, sampled: list[str],
    data: FederatedData, tokenized: list[list[TokenizedExample]], global_state: State,
) -> list[ClientUpdate]:
    tasks = []
    for cid in sampled:
        i = data.client_ids.index(cid)
        fn = lambda w, i=i, cid=cid: fit(  # noqa: E731
            w.model, tokenized[i], cfg.train, global_state, seed=client_seed(cfg, rnd, i),
            pad_token_id=w.tokenizer.pad_token_id, client_id=cid,
        )
        tasks.append(Task(cid, fn))
    results, _ = sched.run(tasks, min_success=cfg.federation.min_clients)
    return [results[c] for c in sampled if c in results]  # sampled order: deterministic sums


def round_record(rnd: int, updates: list[ClientUpdate], global_state: State, n_sampled: int, seconds: float) -> dict:
    down = state_nbytes(global_state) * n_sampled
    return {
        "round": rnd, "event": EVENT_ROUND, "seconds": round(seconds, 3),
        "clients": [{"client_id": u.client_id, "num_examples": u.num_examples, **u.metrics} for u in updates],
        "dropped": n_sampled - len(updates),
        KEY_BYTES_DOWN: down, KEY_BYTES_UP: sum(state_nbytes(u.state) for u in updates),
        "train_loss": sum(u.metrics["train_loss"] * u.num_examples for u in updates) / sum(u.num_examples for u in updates),
    }


def _log_setup(cfg: JobConfig, data: FederatedData, state: State) -> None:
    sizes = ", ".join(f"{cid}={len(rows)}" for cid, rows in zip(data.client_ids, data.client_rows))
    log.info("clients: %s; test questions: %d", sizes, len(data.test_rows))
    log.info("%s: %s trainable parameters, %.2f MB per update (fp32)", cfg.peft.method,
             f"{num_parameters(state):,}", state_nbytes(state) / 1e6)


def log_round(rnd: int, total: int, record: dict) -> None:
    ev = record.get(KEY_EVAL) or {}
    shown = " ".join(f"{k}={v:.4f}" for k, v in ev.items() if isinstance(v, float))
    log.info("[round %d/%d] clients=%d train_loss=%.4f %s (%.1fs)", rnd, total, len(record["clients"]),
             record["train_loss"], shown, record["seconds"])


def run_job(cfg: JobConfig | None, resume: str | Path | None = None, data: FederatedData | None = None) -> RunDir:
    """Run (or resume) a federated job in-process; return its run directory.

    Args:
        cfg: The validated job config. On resume it is read from the run directory instead.
        resume: A run directory to continue from its latest checkpoint.
        data: Client partitions and test rows to use instead of those the config describes
            (baselines: one client alone, or all data centralised).
    """
    if resume:
        run = RunDir(Path(resume))
        cfg = load_config(run.path / CONFIG_FILE)
    else:
        run = RunDir.create(cfg)
    log.info("run directory: %s", run.path)
    data = data or prepare_data(cfg)
    run.write_partitions(data.summary)
    sched = DeviceScheduler(resolve_devices(cfg.model.devices), partial(build_worker, cfg))
    tok = sched.call(lambda w: w.tokenizer)
    tokenized = [tokenize_examples(tok, rows, cfg.data.max_seq_len, cfg.data.system_prompt) for rows in data.client_rows]
    aggregator = build_aggregator(cfg.federation.aggregation.name, cfg.federation.aggregation.params)
    global_state = sched.call(lambda w: get_trainable_state(w.model))
    _log_setup(cfg, data, global_state)
    start, last_eval = 1, None
    ckpt = load_latest_checkpoint(run.path) if resume else None
    if ckpt is not None:
        global_state, start = ckpt.global_state, ckpt.round + 1
        aggregator.load_state_dict(ckpt.server_state)
        run.truncate_metrics_after(ckpt.round)
        log.info("resuming %s after round %d", run.path, ckpt.round)
    elif cfg.eval.zero_shot:
        metrics, preds = sched.call(lambda w: evaluate_global(w, None, cfg, data.test_rows))
        run.log_metrics({"round": 0, "event": EVENT_EVAL, KEY_EVAL: metrics, "zero_shot": True})
        run.write_predictions(preds, "predictions_zero_shot.jsonl")
        log.info("[round 0/%d] zero-shot %s", cfg.federation.rounds, metrics)
    R = cfg.federation.rounds
    for rnd in range(start, R + 1):
        t0 = time.perf_counter()
        sampled = sample_clients(cfg, rnd, data.client_ids)
        updates = train_round(sched, cfg, rnd, sampled, data, tokenized, global_state)
        new_state = aggregator.aggregate(global_state, updates)
        record = round_record(rnd, updates, global_state, len(sampled), time.perf_counter() - t0)
        global_state = new_state
        if rnd == R or (cfg.eval.every and rnd % cfg.eval.every == 0):
            last_eval = sched.call(lambda w: evaluate_global(w, global_state, cfg, data.test_rows))
            record[KEY_EVAL] = last_eval[0]
        run.log_metrics(record)
        log_round(rnd, R, record)
        save_checkpoint(run.path, rnd, global_state, aggregator.state_dict())
    _finish(run, sched, cfg, global_state, last_eval, data)
    return run


def _finish(run: RunDir, sched: DeviceScheduler[Worker], cfg: JobConfig, state: State,
            last_eval: tuple[dict, list[dict]] | None, data: FederatedData) -> None:
    if last_eval is None:  # resumed after the last round had already been evaluated
        last_eval = sched.call(lambda w: evaluate_global(w, state, cfg, data.test_rows))
    metrics, preds = last_eval
    run.write_predictions(preds)
    sched.call(lambda w: save_adapter(w.model, state, run.adapter_dir, cfg))
    run.write_summary({
        "job": cfg.job, "run_dir": str(run.path), "rounds": cfg.federation.rounds,
        "num_clients": cfg.federation.num_clients, "peft": cfg.peft.method,
        "aggregation": cfg.federation.aggregation.name, "trainable_parameters": num_parameters(state),
        "update_bytes": state_nbytes(state), "final": metrics,
    })
