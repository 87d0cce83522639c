"""The deployment's client pool: sites over Flower, for the one round loop (:mod:`fedpeft.rounds`).

:class:`FlowerPool` is what ``fedpeft server`` passes to :func:`~fedpeft.rounds.run_rounds`
where ``fedpeft run`` passes the scheduler's pool: it sends each sampled site its task (the
seed the simulation's client of the same index would use), waits for sites and retries a round
that fell below ``min_clients``. The same config and seed give the simulation's global adapter.
The run folder holds the simulation's files plus ``deploy.yaml`` and ``flower/``; the server
evaluates on its own ``data.test`` (a public test set) if the job has one.
"""

from __future__ import annotations

import json
import logging

from fedpeft.config import JobConfig
from fedpeft.constants import PARTITIONS_FILE
from fedpeft.data.federated import cap_rows  # the simulation's test cap, so both test the same rows
from fedpeft.data.io import load_examples
from fedpeft.deploy.settings import DeployConfig, site_ranks
from fedpeft.deploy.transport import SiteTask, Transport, wait_for_sites
from fedpeft.deploy.wire import site_job_payload
from fedpeft.compression.link import Link
from fedpeft.errors import RoundError
from fedpeft.fold import Fold
from fedpeft.models import resolve_devices
from fedpeft.ranks import client_rank
from fedpeft.rounds import client_seed, run_rounds
from fedpeft.run_dir import RunDir
from fedpeft.site_scores import personal_seed
from fedpeft.state import RoundResult, State
from fedpeft.worker import LocalHost, build_worker

log = logging.getLogger(__name__)


def serve(cfg: JobConfig, dep: DeployConfig, run: RunDir, transport: Transport,
          allow_config_change: tuple[str, ...] = ()) -> State:
    """Run (or resume, from the run folder's latest checkpoint) every round; return the state.

    ``allow_config_change``: config keys that may differ from the checkpoint's (``--resume``).

    Raises:
        RoundError: if a round cannot reach ``federation.min_clients`` after its retries; the
            checkpoint of the last completed round stays, so ``fedpeft server --resume`` goes on.
    """
    host = LocalHost(build_worker(cfg, resolve_devices(cfg.model.devices)[0]))
    return run_rounds(cfg, run, FlowerPool(cfg, dep, run, transport), host, _test_rows(cfg), allow_config_change)


def _test_rows(cfg: JobConfig) -> list[dict]:
    d = cfg.data
    if not d.test:
        log.info("the job has no data.test: the server will not evaluate (sites keep their data)")
        return []
    return cap_rows(load_examples(d.test, d.question_field, d.answer_field), d.max_test_samples, cfg.seed + 1)


class FlowerPool:
    """The sites of ``deploy.yaml`` behind a :class:`Transport`; site ``i`` is client ``i``."""

    def __init__(self, cfg: JobConfig, dep: DeployConfig, run: RunDir, transport: Transport) -> None:
        self.cfg, self.dep, self.transport = cfg, dep, transport
        self.client_ids = list(dep.site_names)
        self.fingerprint = ""  # the sites' data never reach the server
        self.runtime = {"runtime": "flower", "sites": dep.site_names,
                        "secure_aggregation": dep.secure_aggregation.enabled}
        self.job = site_job_payload(cfg)
        self.link = Link.from_config(cfg.federation.compression)
        self.ranks = site_ranks(dep, cfg)  # deploy.yaml's per-site rank, else federation.client_ranks
        self.first = True  # the first round of this process waits for every sampled site
        path = run.path / PARTITIONS_FILE
        self.sizes = {p["site"]: p["size"] for p in json.loads(path.read_text())} if path.is_file() else {}

    def train(self, rnd: int, sampled: list[str], global_state: State, fold: Fold) -> RoundResult:
        """Train round ``rnd`` on the sampled sites; retry it if fewer than ``min_clients`` answer.

        Before the first round (and each retry) the server waits up to ``wait_for_sites_s`` for all
        sampled sites; later rounds start as soon as ``min_clients`` of them are connected.

        Raises:
            RoundError: after ``round_retries`` retries, saying what happened and how to go on.
        """
        tasks = [SiteTask(n, i, client_seed(self.cfg, rnd, i), client_rank(self.ranks, i))
                 for n, i in ((n, self.client_ids.index(n)) for n in sampled)]
        need, total, dropped = self.cfg.federation.min_clients, self.cfg.federation.rounds, []
        for attempt in range(self.dep.round_retries + 1):
            want_all, self.first = self.first or attempt > 0, False
            present = wait_for_sites(self.transport, sampled, need, self.dep.wait_for_sites_s, want_all)
            dropped = [{"client": n, "reason": "not connected"} for n in sampled if n not in present]
            if len(present) >= need:
                fold.restart()  # a retry starts the round over
                for d in dropped:
                    fold.drop(d["client"], d["reason"])
                result = self.transport.train(rnd, [t for t in tasks if t.name in present], global_state, self.job,
                                              fold, self.link)
                result.dropped = dropped + result.dropped
                for d in result.dropped:
                    log.warning("[round %d/%d] site %s dropped out: %s", rnd, total, d["client"], d["reason"])
                if len(result.reports) >= need:
                    self.sizes.update({r.client_id: r.num_examples for r in result.reports})
                    return result
                dropped = result.dropped
            if attempt < self.dep.round_retries:
                log.warning("[round %d/%d] only %d of %d sampled sites trained (min_clients=%d); retrying "
                            "(%d of %d)", rnd, total, len(sampled) - len(dropped), len(sampled), need,
                            attempt + 1, self.dep.round_retries)
        raise RoundError(
            f"round {rnd}/{total}: fewer than min_clients={need} of the sampled sites {sampled} trained "
            f"after {self.dep.round_retries + 1} attempt(s) (dropped: {dropped}). The run stops; the last "
            f"completed round is {rnd - 1}. Start the missing sites, then resume with "
            "`fedpeft server --resume RUN_DIR`.")

    def evaluate_sites(self, rnd: int, state: State | None) -> dict[str, dict]:
        """Every connected site scores ``state`` (``None``: the base model) on its own slice."""
        present = wait_for_sites(self.transport, self.client_ids, 1, self.dep.wait_for_sites_s, want_all=self.first)
        seeds = {n: personal_seed(self.cfg, rnd, self.client_ids.index(n)) for n in present}
        scores = self.transport.evaluate(rnd, present, state, self.job, seeds)
        missing = [n for n in self.client_ids if n not in scores]
        if missing:
            log.warning("[round %d] no per-site scores from %s", rnd, ", ".join(missing))
        return scores

    def partitions(self) -> list[dict]:
        """Each site's training size, as it last reported it."""
        return [{"client": i, "site": n, "size": self.sizes.get(n)} for i, n in enumerate(self.client_ids)]
