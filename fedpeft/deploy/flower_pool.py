"""The deployment's round loop: the simulation's loop with sites behind a :class:`Transport`.

sample -> train sites -> aggregate -> evaluate -> checkpoint, with the core's pieces
(``sample_clients``, ``client_seed``, ``build_worker``, the aggregators, ``save_checkpoint``),
so a deployment with the same config and seed gives the simulation's global adapter. The run
folder holds the simulation's files (``config.yaml``, ``metrics.jsonl``, ``checkpoints/``,
``adapter/``, ``summary.json``, predictions when the job has ``data.test``) plus ``deploy.yaml``
and ``flower/``. The server evaluates on its own ``data.test`` (a public test set) if given.
"""

from __future__ import annotations

import json
import logging
import time

from fedpeft.adapters import save_adapter
from fedpeft.adapters import get_trainable_state, num_parameters, state_nbytes
from fedpeft.aggregators import Aggregator, build_aggregator
from fedpeft.checkpoint import load_latest_checkpoint, save_checkpoint
from fedpeft.config import JobConfig
from fedpeft.constants import EVENT_EVAL, KEY_BYTES_DOWN, KEY_BYTES_UP, KEY_EVAL, PARTITIONS_FILE
from fedpeft.data.federated import cap_rows  # the simulation's test cap, so both test the same rows
from fedpeft.data.io import load_examples
from fedpeft.deploy.settings import DeployConfig
from fedpeft.deploy.transport import RoundResult, SiteTask, Transport, wait_for_sites
from fedpeft.deploy.wire import site_job_payload
from fedpeft.errors import RoundError
from fedpeft.loop import Worker, build_worker, client_seed, evaluate_global, log_round, round_record, sample_clients
from fedpeft.models import resolve_devices
from fedpeft.run_dir import RunDir
from fedpeft.state import ClientUpdate, State

log = logging.getLogger(__name__)


def serve(cfg: JobConfig, dep: DeployConfig, run: RunDir, transport: Transport) -> State:
    """Run (or resume, from the run folder's latest checkpoint) every round; return the state.

    Raises:
        RoundError: if a round cannot reach ``federation.min_clients`` after its retries; the
            checkpoint of the last completed round stays, so ``fedpeft server --resume`` goes on.
    """
    worker = build_worker(cfg, resolve_devices(cfg.model.devices)[0])
    test = _test_rows(cfg)
    aggregator = build_aggregator(cfg.federation.aggregation.name, cfg.federation.aggregation.params)
    state, start, last_eval = _start(cfg, run, worker, aggregator, test)
    job, total = site_job_payload(cfg), cfg.federation.rounds
    for rnd in range(start, total + 1):
        t0 = time.perf_counter()
        result = run_round(transport, cfg, dep, rnd, state, job, first=rnd == start)
        if result.updates is not None:  # plain: exactly the simulation's aggregate call
            new_state = aggregator.aggregate(state, result.updates)
        else:  # SecAgg+: the server only ever sees the weighted mean
            new_state = aggregator.step(state, result.mean)
        record = site_round_record(rnd, result, state, time.perf_counter() - t0)
        state = new_state
        if test and (rnd == total or (cfg.eval.every and rnd % cfg.eval.every == 0)):
            last_eval = evaluate_global(worker, state, cfg, test)
            record[KEY_EVAL] = last_eval[0]
        run.log_metrics(record)
        log_round(rnd, total, record)
        save_checkpoint(run.path, rnd, state, aggregator.state_dict())
        _write_partitions(run, dep, result)
    _finish(cfg, dep, run, worker, state, last_eval, test)
    return state


def _test_rows(cfg: JobConfig) -> list[dict]:
    d = cfg.data
    if not d.test:
        log.info("the job has no data.test: the server will not evaluate (sites keep their data)")
        return []
    return cap_rows(load_examples(d.test, d.question_field, d.answer_field), d.max_test_samples, cfg.seed + 1)


def _start(cfg: JobConfig, run: RunDir, worker: Worker, aggregator: Aggregator,
           test: list[dict]) -> tuple[State, int, tuple[dict, list[dict]] | None]:
    """Initial state (seeded adapter init, as in the simulation) or the latest checkpoint."""
    ckpt = load_latest_checkpoint(run.path)
    if ckpt is not None:
        aggregator.load_state_dict(ckpt.server_state)
        run.truncate_metrics_after(ckpt.round)
        log.info("resuming %s after round %d", run.path, ckpt.round)
        return ckpt.global_state, ckpt.round + 1, None
    if test and cfg.eval.zero_shot:
        metrics, preds = evaluate_global(worker, None, cfg, test)
        run.log_metrics({"round": 0, "event": EVENT_EVAL, KEY_EVAL: metrics, "zero_shot": True})
        run.write_predictions(preds, "predictions_zero_shot.jsonl")
        log.info("[round 0/%d] zero-shot %s", cfg.federation.rounds, metrics)
    return get_trainable_state(worker.model), 1, None


def round_tasks(cfg: JobConfig, dep: DeployConfig, rnd: int) -> list[SiteTask]:
    """The sampled sites of round ``rnd`` with the seeds the simulation's clients would use."""
    names = dep.site_names
    return [SiteTask(n, names.index(n), client_seed(cfg, rnd, names.index(n)))
            for n in sample_clients(cfg, rnd, names)]


def run_round(transport: Transport, cfg: JobConfig, dep: DeployConfig, rnd: int, state: State,
              job: str, first: bool) -> RoundResult:
    """Train round ``rnd`` on its sampled sites; retry it if fewer than ``min_clients`` answer.

    Before the first round (and each retry) the server waits up to ``wait_for_sites_s`` for all
    sampled sites; later rounds start as soon as ``min_clients`` of them are connected.

    Raises:
        RoundError: after ``round_retries`` retries, saying what happened and how to go on.
    """
    tasks, need, total = round_tasks(cfg, dep, rnd), cfg.federation.min_clients, cfg.federation.rounds
    names, failed = [t.name for t in tasks], {}
    for attempt in range(dep.round_retries + 1):
        present = wait_for_sites(transport, names, need, dep.wait_for_sites_s, want_all=first or attempt > 0)
        failed = {n: "not connected" for n in names if n not in present}
        if len(present) >= need:
            result = transport.train(rnd, [t for t in tasks if t.name in present], state, job)
            result.failed = {**failed, **result.failed}
            for name, why in result.failed.items():
                log.warning("[round %d/%d] site %s dropped out: %s", rnd, total, name, why)
            if len(result.reports) >= need:
                return result
            failed = result.failed
        if attempt < dep.round_retries:
            log.warning("[round %d/%d] only %d of %d sampled sites trained (min_clients=%d); "
                        "retrying (%d of %d)", rnd, total, len(names) - len(failed), len(names),
                        need, attempt + 1, dep.round_retries)
    raise RoundError(
        f"round {rnd}/{total}: fewer than min_clients={need} of the sampled sites {names} trained "
        f"after {dep.round_retries + 1} attempt(s) (dropped: {failed}). The run stops; the last "
        f"completed round is {rnd - 1}. Start the missing sites, then resume with "
        "`fedpeft server --resume RUN_DIR`.")


def site_round_record(rnd: int, result: RoundResult, state: State, seconds: float) -> dict:
    """The simulation's metrics record, with each site's measured bytes down and up."""
    updates = result.updates or [ClientUpdate(r.name, {}, r.num_examples, r.metrics)
                                 for r in result.reports]
    n_sampled = len(result.reports) + len(result.failed)
    record = round_record(rnd, updates, state, n_sampled, seconds)
    by_name = {r.name: r for r in result.reports}
    for entry in record["clients"]:
        site = by_name[entry["client_id"]]
        entry[KEY_BYTES_DOWN], entry[KEY_BYTES_UP] = site.bytes_down, site.bytes_up
    record[KEY_BYTES_DOWN] = sum(r.bytes_down for r in result.reports)
    record[KEY_BYTES_UP] = sum(r.bytes_up for r in result.reports)
    record["failed"] = result.failed
    record["secure_aggregation"] = result.updates is None
    return record


def _write_partitions(run: RunDir, dep: DeployConfig, result: RoundResult) -> None:
    """``partitions.json``: each site's training size (as it last reported it)."""
    path = run.path / PARTITIONS_FILE
    sizes = {p["site"]: p["size"] for p in json.loads(path.read_text())} if path.is_file() else {}
    sizes.update({r.name: r.num_examples for r in result.reports})
    run.write_partitions([{"client": i, "site": n, "size": sizes.get(n)}
                          for i, n in enumerate(dep.site_names)])


def _finish(cfg: JobConfig, dep: DeployConfig, run: RunDir, worker: Worker, state: State,
            last_eval: tuple[dict, list[dict]] | None, test: list[dict]) -> None:
    if test and last_eval is None:  # resumed after the last round
        last_eval = evaluate_global(worker, state, cfg, test)
    if last_eval is not None:
        run.write_predictions(last_eval[1])
    save_adapter(worker.model, state, run.adapter_dir, cfg)
    run.write_summary({
        "job": cfg.job, "run_dir": str(run.path), "rounds": cfg.federation.rounds,
        "num_clients": cfg.federation.num_clients, "peft": cfg.peft.method,
        "aggregation": cfg.federation.aggregation.name, "trainable_parameters": num_parameters(state),
        "update_bytes": state_nbytes(state), "final": last_eval[0] if last_eval else {},
        "runtime": "flower", "sites": dep.site_names,
        "secure_aggregation": dep.secure_aggregation.enabled,
    })
