"""The round loop, written once: sample -> train -> aggregate -> evaluate -> checkpoint.

``fedpeft run`` (:mod:`fedpeft.simulation`), ``fedpeft server`` (:mod:`fedpeft.deploy.flower_pool`)
and the benchmark's baselines all call :func:`run_rounds`. They differ only in the
:class:`ClientPool` passed in (where clients train) and the :class:`~fedpeft.worker.Host` that
evaluates and saves the global adapter, as Flower's ``Strategy.start`` runs unchanged over a
simulation or a deployment ``Grid``. A feature that changes the round is written here once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from typing import Protocol

import numpy as np

from fedpeft.adapters import get_trainable_state, num_parameters, save_adapter, state_nbytes
from fedpeft.aggregators import Aggregator, aggregate, build_aggregator, needs_every_update
from fedpeft.checkpoint import Checkpoint, load_latest_checkpoint, save_checkpoint
from fedpeft.config import JobConfig, flatten
from fedpeft.constants import (
    EVENT_EVAL, EVENT_ROUND, KEY_BYTES_DOWN, KEY_BYTES_UP, KEY_EPSILON, KEY_EVAL, KEY_TRAIN_LOSS,
    PREDICTIONS_ZERO_SHOT_FILE,
)
from fedpeft.errors import CheckpointError, RoundError
from fedpeft.fold import Fold
from fedpeft.io_utils import read_jsonl
from fedpeft.privacy.ledger import Ledger
from fedpeft.problems import did_you_mean
from fedpeft.run_dir import RunDir
from fedpeft.site_scores import KEY_SITES, summarize
from fedpeft.state import RoundResult, State
from fedpeft.update_checks import check_global, check_secure_mean
from fedpeft.worker import Host, evaluate_global

log = logging.getLogger(__name__)

KEY_SITES_MISSING = "sites_missing"  # sites whose per-site score did not come back (left out of site_*)

Evaluation = tuple[dict, list[dict], int]  # (metrics, predictions, round)
POOL_STATE_KEY = "__client_pool__"  # in the checkpoint's server state: the pool's own state


class ClientPool(Protocol):
    """Where the clients of a round train: the in-process scheduler, or sites over Flower.

    Attributes:
        client_ids: Every client, in index order (a client's index seeds its training).
        runtime: What ``summary.json`` says about the runtime (``{"runtime": "simulation"}``).
        fingerprint: A digest of the clients' data where the pool can see it (``""`` otherwise);
            a resumed run must find the same.
    """

    client_ids: list[str]
    runtime: dict
    fingerprint: str

    def train(self, rnd: int, sampled: list[str], global_state: State, fold: Fold) -> RoundResult:
        """Have each sampled client train from ``global_state``; hand each update to ``fold``.

        A pool adds each update to ``fold`` as it arrives (and ``fold.drop``s a client that sent
        none), reporting only the clients whose update ``fold.add`` accepted; under secure
        aggregation it returns the mean instead. Updates it returns in ``RoundResult.updates``
        are added after it returns (a pool that cannot stream).

        Raises:
            RoundError: if fewer than ``federation.min_clients`` clients trained.
        """
        ...

    def partitions(self) -> list[dict]:
        """``partitions.json``: each client's training-set size (and how it was made)."""
        ...


def sample_clients(cfg: JobConfig, rnd: int, client_ids: list[str]) -> list[str]:
    """The clients of round ``rnd``: a seeded sample, derived from (seed, round) alone."""
    k = cfg.sampled_per_round()
    if k >= len(client_ids):
        return list(client_ids)
    picked = random.Random(f"{cfg.seed}-{rnd}").sample(range(len(client_ids)), k)
    return [client_ids[i] for i in sorted(picked)]


def client_seed(cfg: JobConfig, rnd: int, index: int) -> int:
    """Seed of client ``index``'s local training in round ``rnd``: distinct for every
    (seed, round, client), however many clients (``numpy.random.SeedSequence``)."""
    return int(np.random.SeedSequence([cfg.seed, rnd, index]).generate_state(1, np.uint64)[0] >> 1)


def run_rounds(cfg: JobConfig, run: RunDir, pool: ClientPool, host: Host, test: list[dict],
               allow_config_change: tuple[str, ...] = ()) -> State:
    """Run every round of ``cfg`` not yet checkpointed in ``run``; write the run's outputs.

    A folder with a checkpoint continues after it (``--resume``); records of rounds after the
    checkpoint, left by a run that died, are dropped first, so the metrics equal an
    uninterrupted run's line for line.

    Args:
        cfg: The job.
        run: Its run folder.
        pool: Where clients train.
        host: Holds the server's model: evaluates and saves the global adapter.
        test: Test rows; empty: no evaluation (a deployment without ``data.test``).
        allow_config_change: Dotted config keys that may differ from the checkpoint's on resume
            (e.g. ``federation.rounds`` to add rounds); any other change is an error.

    Returns:
        The final global adapter state.
    """
    aggregator = build_aggregator(cfg.federation.aggregation.name, cfg.federation.aggregation.params)
    # where the folder is and where its numbers are also sent, not what it computes: a moved run resumes
    where = ("job", "workspace", "run_id", "tracking.backends", "tracking.mlflow_uri")
    config = {k: v for k, v in flatten(cfg.model_dump(mode="json")).items() if k not in where}
    fingerprint = {"config": config, "data": _digest([pool.fingerprint, test])}
    state, start = _start(cfg, run, host, aggregator, pool, test, fingerprint, allow_config_change)
    total, last_eval, last_sites, ledger = cfg.federation.rounds, None, None, _ledger(cfg, run)
    for rnd in range(start, total + 1):
        if _budget_spent(ledger, rnd, total):
            last_eval = last_eval if last_eval and last_eval[2] == rnd - 1 else None
            break
        t0 = time.perf_counter()
        sampled = sample_clients(cfg, rnd, pool.client_ids)
        fold = new_fold(cfg, aggregator, state, sampled, f"[round {rnd}/{total}]")
        result = _folded(pool.train(rnd, sampled, state, fold), fold, state)
        _require_min_clients(cfg, rnd, result)
        updates, mean = (None, result.mean) if result.secure else fold.result()
        _log_held(fold, state, f"[round {rnd}/{total}]")
        new_state = aggregate(aggregator, state, updates, mean=mean)
        del fold, updates, mean
        check_global(new_state, rnd)
        record = round_record(rnd, result, time.perf_counter() - t0)
        if getattr(aggregator, "round_report", None):  # e.g. svd: the energy its truncation kept
            record["aggregation"] = dict(aggregator.round_report)
        _account(ledger, record, len(sampled))
        state = new_state
        evaluating = rnd == total or bool(cfg.eval.every and rnd % cfg.eval.every == 0)
        if test and evaluating:
            items: dict = {}
            last_eval = (*host.call(lambda w: evaluate_global(w, state, cfg, test, items)), rnd)
            run.write_item_scores(items)
            record[KEY_EVAL] = last_eval[0]
        if evaluating:
            last_sites = score_sites(cfg, pool, rnd, state, record) or last_sites
        run.log_metrics(record)
        log_round(rnd, total, record)
        save_checkpoint(run.path, rnd, state, _server_state(aggregator, pool), fingerprint, keep=cfg.checkpoint.keep)
        run.write_partitions(pool.partitions())
    _finish(cfg, run, pool, host, state, last_eval, test, _privacy_summary(ledger), last_sites)
    return state


def score_sites(cfg: JobConfig, pool: ClientPool | None, rnd: int, state: State | None, record: dict) -> dict | None:
    """Per-site scores (``data.client_test_ratio``) of ``state`` into ``record``; their summary, or None."""
    if not cfg.data.client_test_ratio or pool is None or not hasattr(pool, "evaluate_sites"):
        return None
    per_site = pool.evaluate_sites(rnd, state)
    if not per_site:
        return None
    summary = summarize(per_site)
    record[KEY_SITES] = per_site
    record.setdefault(KEY_EVAL, {}).update(summary)
    worst = {k: round(v, 4) for k, v in summary.items() if k.startswith("site_worst/")}
    log.info("[round %d] %d sites scored their own slices: %s", rnd, len(per_site), worst)
    missing = [c for c in pool.client_ids if c not in per_site]
    if missing:  # the mean and worst site are over the others: say so wherever they are read
        record[KEY_SITES_MISSING] = missing
        log.warning("[round %d] site_mean/site_worst leave out %s (no score came back)", rnd, ", ".join(missing))
        return {**summary, KEY_SITES_MISSING: missing}
    return summary


def new_fold(cfg: JobConfig, aggregator: Aggregator, state: State, sampled: list[str], where: str) -> Fold:
    """The round's :class:`Fold`: streaming, or holding every update for a rule that needs each one."""
    return Fold(state, sampled, hold=needs_every_update(aggregator), max_norm=cfg.federation.max_update_norm,
                where=where, prepare=getattr(aggregator, "prepare", None),
                ordered=cfg.federation.fold_order == "sampled")


def _folded(result: RoundResult, fold: Fold, state: State) -> RoundResult:
    """``result`` once the updates a pool returned (rather than streamed) are added to ``fold``."""
    if result.secure:
        result.mean = check_secure_mean(result.mean, fold.where)
        return result
    if result.updates is not None:
        for update in result.updates:
            fold.add(update)
        result.updates = None
    accepted = set(fold.accepted)
    result.reports = [r for r in result.reports if r.client_id in accepted]
    result.dropped = result.dropped + [d for d in fold.dropped if d not in result.dropped]
    return result


def _log_held(fold: Fold, state: State, where: str) -> None:
    """Say what the server held this round when it was more than one update."""
    if fold.peak_held > 1:
        mb = fold.peak_held * state_nbytes(state) / 1e6
        why = ("the aggregation rule needs every update (it cannot stream)" if fold.hold
               else "sites answered out of sampled order (federation.fold_order: arrival holds one)")
        log.info("%s server held %d updates at once (%.1f MB): %s", where, fold.peak_held, mb, why)


def _server_state(aggregator: Aggregator, pool: ClientPool) -> dict:
    """What the checkpoint keeps besides the adapter: the aggregator's state, and the pool's (the
    simulation's clients' top-k residuals) under :data:`POOL_STATE_KEY`."""
    state = aggregator.state_dict()
    pool_state = pool.state_dict() if hasattr(pool, "state_dict") else None
    return {**state, POOL_STATE_KEY: pool_state} if pool_state else state


def _ledger(cfg: JobConfig, run: RunDir) -> Ledger:
    """The run's privacy ledger, with the rounds already in ``metrics.jsonl`` (a resumed run)."""
    ledger = Ledger(cfg)
    if ledger.enabled and run.metrics_file.is_file():
        for record in read_jsonl(run.metrics_file):
            if record.get("event") == EVENT_ROUND:
                ledger.add(record)
    return ledger


def _budget_spent(ledger: Ledger, rnd: int, total: int) -> bool:
    """Stop before a round that would take epsilon past ``privacy.target_epsilon``."""
    projected = ledger.over_target()
    if projected is None:
        return False
    ledger.stopped_before = rnd
    log.warning("privacy: stopping before round %d/%d: epsilon would reach %.4g, above privacy.target_epsilon "
                "%.4g; the adapter of round %d is the run's result", rnd, total, projected,
                ledger.privacy.target_epsilon, rnd - 1)
    return True


def _account(ledger: Ledger, record: dict, sampled: int) -> None:
    """Add the round's privacy entry and the run's epsilon so far to its record."""
    if ledger.enabled:
        record["privacy"] = ledger.round_privacy(sampled, len(record["clients"]))
        ledger.add(record)
        record[KEY_EPSILON] = ledger.epsilon()


def _privacy_summary(ledger: Ledger) -> dict:
    """``summary.json``'s ``epsilon`` and ``privacy`` fields (none without DP)."""
    if not ledger.enabled:
        return {}
    eps = ledger.epsilon()
    entry = {**ledger.round_privacy(0, 0), KEY_EPSILON: eps, "target_epsilon": ledger.privacy.target_epsilon,
             "stopped_before_round": ledger.stopped_before}
    if ledger.privacy.level == "example":
        entry["client_epsilon"] = ledger.per_client()
    for key in ("shares", "summed", "effective_noise_multiplier"):
        entry.pop(key, None)
    return {KEY_EPSILON: eps, "privacy": entry}

def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def check_same_run(ckpt: Checkpoint, fingerprint: dict, allow: tuple[str, ...]) -> None:
    """Refuse to resume with another config or other data than the checkpoint was made with.

    Raises:
        CheckpointError: listing each changed key (old -> new), or saying the data changed.
    """
    if "config" not in ckpt.meta:
        return  # written before fingerprints existed
    old, new = ckpt.meta["config"], fingerprint["config"]
    unknown = [k for k in allow if k not in old and k not in new]
    if unknown:
        raise CheckpointError(f"--allow-config-change {unknown[0]}: no such config key"
                              f"{did_you_mean(unknown[0], sorted(new))}")
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and k not in allow]
    if changed:
        diffs = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise CheckpointError(
            f"the config differs from the one round {ckpt.round}'s checkpoint was made with ({diffs}); a resumed "
            "run would not be the run that was started. Restore config.yaml, or allow a deliberate change with "
            f"--allow-config-change {changed[0]} (e.g. federation.rounds to add rounds).")
    if ckpt.meta.get("data") != fingerprint["data"]:
        raise CheckpointError(
            f"the training or test data differ from what round {ckpt.round}'s checkpoint was trained on (a data "
            "file changed since the run started); restore the files, or start a new run.")


def _require_min_clients(cfg: JobConfig, rnd: int, result: RoundResult) -> None:
    """Raises RoundError when fewer than ``min_clients`` updates are left after screening."""
    need = cfg.federation.min_clients
    if len(result.reports) < need:
        why = "; ".join(f"{d['client']}: {d['reason']}" for d in result.dropped)
        raise RoundError(f"round {rnd}/{cfg.federation.rounds}: only {len(result.reports)} usable update(s), fewer "
                         f"than federation.min_clients={need} (dropped: {why}). The last completed round is "
                         f"{rnd - 1}; fix the clients, then resume with --resume RUN_DIR.")


def _start(cfg: JobConfig, run: RunDir, host: Host, aggregator: Aggregator, pool: ClientPool, test: list[dict],
           fingerprint: dict, allow: tuple[str, ...]) -> tuple[State, int]:
    """The latest checkpoint's state and next round, or the seeded initial adapter (after zero-shot)."""
    ckpt = load_latest_checkpoint(run.path)
    if ckpt is not None:
        check_same_run(ckpt, fingerprint, allow)
    run.truncate_metrics_after(ckpt.round if ckpt else -1)
    if ckpt is not None:
        server = dict(ckpt.server_state)
        pool_state = server.pop(POOL_STATE_KEY, None)
        aggregator.load_state_dict(server)
        if pool_state is not None and hasattr(pool, "load_state_dict"):
            pool.load_state_dict(pool_state)
        log.info("resuming %s after round %d", run.path, ckpt.round)
        return ckpt.global_state, ckpt.round + 1
    if cfg.eval.zero_shot and (test or cfg.data.client_test_ratio):
        zero_shot(cfg, run, host, test, pool)
    return host.call(lambda w: get_trainable_state(w.model)), 1


def zero_shot(cfg: JobConfig, run: RunDir, host: Host, test: list[dict], pool: ClientPool | None = None) -> dict:
    """Score the base model alone (round 0), on ``test`` and on the sites' own slices (``pool``);
    write its record and predictions; return its metrics."""
    items: dict = {}
    metrics, preds = host.call(lambda w: evaluate_global(w, None, cfg, test, items)) if test else ({}, [])
    run.write_item_scores(items, zero_shot=True)
    record = {"round": 0, "event": EVENT_EVAL, KEY_EVAL: metrics, "zero_shot": True}
    score_sites(cfg, pool, 0, None, record)
    run.log_metrics(record)
    if test:
        run.write_predictions(preds, PREDICTIONS_ZERO_SHOT_FILE)
    log.info("[round 0/%d] zero-shot %s", cfg.federation.rounds, metrics)
    return metrics


def _finish(cfg: JobConfig, run: RunDir, pool: ClientPool, host: Host, state: State,
            last_eval: Evaluation | None, test: list[dict], privacy: dict, sites: dict | None = None) -> None:
    """Final predictions, the adapter folder and ``summary.json`` (final scores, per-site summary too)."""
    if test and last_eval is None:  # resumed after the last round had already been evaluated
        items: dict = {}
        last_eval = host.call(lambda w: evaluate_global(w, state, cfg, test, items))
        run.write_item_scores(items)
    if sites is None:  # the same: score the sites again (no record is written)
        sites = score_sites(cfg, pool, cfg.federation.rounds, state, {})
    if last_eval is not None:
        run.write_predictions(last_eval[1])
    host.call(lambda w: save_adapter(w.model, state, run.adapter_dir, cfg))
    final = {**(last_eval[0] if last_eval else {}), **(sites or {})}
    write_summary(cfg, run, state, final, **pool.runtime, **privacy)


def write_summary(cfg: JobConfig, run: RunDir, state: State | None, final: dict, **fields: object) -> None:
    """``summary.json``: the job, its adapter's size, the final scores; ``fields`` add or override."""
    run.write_summary({
        "job": cfg.job, "run_dir": str(run.path), "rounds": cfg.federation.rounds,
        "num_clients": cfg.federation.num_clients, "peft": cfg.peft.method,
        "aggregation": cfg.federation.aggregation.name, "trainable_parameters": num_parameters(state or {}),
        "update_bytes": state_nbytes(state or {}), "final": final, **fields,
    })


def round_record(rnd: int, result: RoundResult, seconds: float) -> dict:
    """The ``metrics.jsonl`` record of one round: each client's metrics and bytes, who dropped and why."""
    reports = result.reports
    weight = sum(r.num_examples for r in reports)
    return {
        "round": rnd, "event": EVENT_ROUND, "seconds": round(seconds, 3),
        "clients": [{"client_id": r.client_id, "num_examples": r.num_examples, **r.metrics,
                     KEY_BYTES_DOWN: r.bytes_down, KEY_BYTES_UP: r.bytes_up} for r in reports],
        "dropped": result.dropped,
        KEY_BYTES_DOWN: sum(r.bytes_down for r in reports), KEY_BYTES_UP: sum(r.bytes_up for r in reports),
        KEY_TRAIN_LOSS: sum(r.metrics[KEY_TRAIN_LOSS] * r.num_examples for r in reports) / max(weight, 1),
        "secure_aggregation": result.secure,
    }


def log_round(rnd: int, total: int, record: dict) -> None:
    """One ``[round r/R]`` line: clients, train loss, evaluation metrics, seconds."""
    ev = record.get(KEY_EVAL) or {}
    shown = " ".join(f"{k}={v:.4f}" for k, v in ev.items() if isinstance(v, float))
    dropped = f" dropped={[d['client'] for d in record['dropped']]}" if record["dropped"] else ""
    if KEY_EPSILON in record:
        shown += f" epsilon={record[KEY_EPSILON]:.4g} (delta={record['privacy']['delta']:.0e})"
    log.info("[round %d/%d] clients=%d%s train_loss=%.4f %s (%.1fs)", rnd, total, len(record["clients"]),
             dropped, record[KEY_TRAIN_LOSS], shown, record["seconds"])
