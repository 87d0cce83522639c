"""``fedpeft run``: the round loop with every client in this process, on the device scheduler.

:class:`SchedulerPool` is the simulation's :class:`~fedpeft.rounds.ClientPool`: each sampled
client is a task on the :class:`~fedpeft.scheduler.DeviceScheduler` (one base model per device,
the client's adapter swapped in and out), trained by the core's ``fit``. The Flower deployment
runs the same loop with its own pool (:mod:`fedpeft.deploy.flower_pool`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import partial
from pathlib import Path

from fedpeft.adapters import get_trainable_state, num_parameters, state_nbytes
from fedpeft.compression import ErrorFeedback, payload_nbytes
from fedpeft.compression.link import Broadcast, Link
from fedpeft.ranks import client_rank, pad
from fedpeft.config import JobConfig, load_config
from fedpeft.constants import CONFIG_FILE
from fedpeft.errors import RunInterrupted
from fedpeft.data.federated import FederatedData, prepare_data
from fedpeft.data.prompts import TokenizedExample, tokenize_examples
from fedpeft.models import resolve_devices
from fedpeft.privacy.ledger import resolve_noise
from fedpeft.rounds import client_seed, run_rounds
from fedpeft.run_dir import RunDir
from fedpeft.scheduler import DeviceScheduler, Task
from fedpeft.fold import Fold
from fedpeft.state import ClientReport, RoundResult, State
from fedpeft.trainer import fit
from fedpeft.site_scores import personal_seed, score_site
from fedpeft.worker import Worker, build_worker

log = logging.getLogger(__name__)


class SchedulerPool:
    """Clients in this process: one task each on the device scheduler.

    Args:
        cfg: The job (training hyperparameters, ``min_clients``).
        sched: The scheduler holding one worker (base model) per device.
        data: The clients' rows (for ``partitions.json``).
        tokenized: Each client's tokenized examples, in ``data.client_ids`` order.
    """

    runtime = {"runtime": "simulation"}

    def __init__(self, cfg: JobConfig, sched: DeviceScheduler[Worker], data: FederatedData,
                 tokenized: list[list[TokenizedExample]]) -> None:
        self.cfg, self.sched, self.data, self.tokenized = cfg, sched, data, tokenized
        self.client_ids = list(data.client_ids)
        self.fingerprint = hashlib.sha256(json.dumps([data.client_ids, data.client_rows], sort_keys=True,
                                                     default=str).encode()).hexdigest()
        self.link = Link.from_config(cfg.federation.compression)
        self.feedback: dict[str, ErrorFeedback] = {}  # each client's top-k residual ("kept on the client")

    def train(self, rnd: int, sampled: list[str], global_state: State, fold: Fold) -> RoundResult:
        """Train ``sampled`` from ``global_state``; each update goes into ``fold`` as its client finishes.

        Clients train from what a site would decode: the broadcast through the job's codec, only
        their rank's components (:meth:`~fedpeft.compression.link.Link.broadcast`), as deployed.
        """
        ranks = {cid: client_rank(self.cfg.federation.client_ranks, self.client_ids.index(cid)) for cid in sampled}
        views = {r: self.link.broadcast(global_state, r) for r in set(ranks.values())}
        tasks = [Task(cid, partial(self._fit, index=self.client_ids.index(cid), rnd=rnd, state=global_state,
                                   view=views[ranks[cid]], shares=len(sampled), fold=fold)) for cid in sampled]
        results, failures = self.sched.run(tasks, min_success=self.cfg.federation.min_clients)
        dropped = [{"client": f.client_id, "reason": f.reason} for f in failures]
        for d in dropped:
            fold.drop(d["client"], d["reason"])
        reports = [results[c] for c in sampled if results.get(c) is not None]
        return RoundResult(reports, dropped=dropped)

    def _fit(self, worker: Worker, index: int, rnd: int, state: State, view: Broadcast, shares: int,
             fold: Fold) -> ClientReport | None:
        """Train client ``index`` from ``view``, add its update to ``fold``; its report, or None if refused."""
        cid = self.client_ids[index]
        start = pad(view.start, {k: v.shape for k, v in state.items()})
        update = fit(worker.model, self.tokenized[index], self.cfg.train, start,
                     seed=client_seed(self.cfg, rnd, index), pad_token_id=worker.tokenizer.pad_token_id,
                     client_id=cid, privacy=self.cfg.privacy, rounds=self.cfg.federation.rounds, shares=shares)
        up = state_nbytes(update.state)
        if not (self.link.plain and view.rank is None):  # what a site would send, as the server rebuilds it
            arrays = self.link.client_reply(view.start, update.state, view.rank,
                                            self.feedback.setdefault(cid, ErrorFeedback()))
            update.state, up = self.link.rebuild(arrays, state, view.rank), payload_nbytes(arrays)
        report = ClientReport(cid, update.num_examples, update.metrics, view.nbytes, up)
        return None if fold.add(update) is not None else report

    def evaluate_sites(self, rnd: int, state: State | None) -> dict[str, dict]:
        """Score ``state`` (``None``: the base model) on every client's own slice, on the worker."""
        scores, own = {}, not self.data.site_ids  # the slices are the clients' own (not the centralised baseline's)
        for i, (sid, rows) in enumerate(zip(self.data.site_ids or self.client_ids, self.data.client_test_rows)):
            if rows:
                train, seed = (self.tokenized[i] if own else None), personal_seed(self.cfg, rnd, i)
                scores[sid] = self.sched.call(
                    lambda w, rows=rows, train=train, seed=seed: score_site(w, state, self.cfg, rows, train, seed))
        return scores

    def state_dict(self) -> dict:
        """The clients' error-feedback residuals (top-k), for the checkpoint."""
        return {cid: fb.state_dict() for cid, fb in self.feedback.items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.feedback = {cid: ErrorFeedback() for cid in state}
        for cid, residual in state.items():
            self.feedback[cid].load_state_dict(residual)

    def partitions(self) -> list[dict]:
        return self.data.summary


def build_pool(cfg: JobConfig, data: FederatedData) -> SchedulerPool:
    """Load one model per device and tokenize every client's rows once."""
    sched = DeviceScheduler(resolve_devices(cfg.model.devices), partial(build_worker, cfg))
    tok = sched.call(lambda w: w.tokenizer)
    tokenized = [tokenize_examples(tok, rows, cfg.data.max_seq_len, cfg.data.system_prompt) for rows in data.client_rows]
    return SchedulerPool(cfg, sched, data, tokenized)


def run_job(cfg: JobConfig | None, resume: str | Path | None = None, data: FederatedData | None = None,
            allow_config_change: tuple[str, ...] = ()) -> RunDir:
    """Run (or resume) a federated job in-process; return its run directory.

    Args:
        cfg: The validated job config. On resume it is read from the run directory instead.
        resume: A run directory to continue from its latest checkpoint.
        data: Client partitions and test rows to use instead of those the config describes
            (baselines: one client alone, or all data centralised).
        allow_config_change: Dotted keys of ``config.yaml`` that may differ from the
            checkpoint's on resume (``federation.rounds`` to add rounds).

    Raises:
        ConfigError: if the run folder is in use by another fedpeft process.
        CheckpointError: if resuming with another config or data, or no checkpoint verifies.
    """
    if resume:
        run = RunDir.open(Path(resume))
        cfg = load_config(run.path / CONFIG_FILE)
    else:
        cfg = resolve_noise(cfg)  # config.yaml holds the calibrated noise
        run = RunDir.create(cfg)
    log.info("run directory: %s", run.path)
    try:
        data = data or prepare_data(cfg)
        run.write_partitions(data.summary)
        pool = build_pool(cfg, data)
        _log_setup(cfg, pool)
        run_rounds(cfg, run, pool, pool.sched, data.test_rows, allow_config_change)
    except KeyboardInterrupt:
        raise RunInterrupted(run.where_to_resume("fedpeft run --resume")) from None
    except BaseException:
        if not resume:
            run.remove_if_untrained()
        raise
    finally:
        run.release()
    return run


def _log_setup(cfg: JobConfig, pool: SchedulerPool) -> None:
    data = pool.data
    sizes = ", ".join(f"{cid}={len(rows)}" for cid, rows in zip(data.client_ids, data.client_rows))
    log.info("clients: %s; test questions: %d", sizes, len(data.test_rows))
    state = pool.sched.call(lambda w: get_trainable_state(w.model))
    log.info("%s: %s trainable parameters, %.2f MB per update (fp32)", cfg.peft.method,
             f"{num_parameters(state):,}", state_nbytes(state) / 1e6)
