"""One site's training: the core's ``fit`` on the site's own file, the model kept between rounds.

A site trains exactly like client ``i`` of the simulation: same model and seeded adapter
(``fedpeft.worker.build_worker``), same rows (:func:`fedpeft.deploy.wire.site_rows`), same seed
(sent by the server: ``fedpeft.rounds.client_seed(cfg, round, i)``). :class:`SiteTrainer` runs in
``fedpeft client``'s process (behind :mod:`fedpeft.deploy.trainer_service`), so torch,
transformers and the model are loaded once, not once per Flower message.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpeft.adapters import trainable_parameters
from fedpeft.compression import ErrorFeedback
from fedpeft.compression.link import Link
from fedpeft.data.prompts import TokenizedExample, tokenize_examples
from fedpeft.deploy import constants as C
from fedpeft.deploy.site_policy import SitePolicy, check_job, check_privacy
from fedpeft.deploy.wire import site_data, site_job_from_payload, site_rows
from fedpeft.config import JobConfig
from fedpeft.errors import ConfigError
from fedpeft.privacy.client_level import private_seed
from fedpeft.site_scores import KEY_N, score_site
from fedpeft.worker import Worker, build_worker
from fedpeft.models import resolve_devices
from fedpeft.trainer import fit

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


class SiteTrainer:
    """Trains this site's adapter on request; caches the model and the tokenized rows.

    Args:
        name: This site's name (a request for another site is refused).
        data_path: This site's JSONL file.
        device: ``""`` for the job's ``model.devices``, or e.g. ``"cuda:0"``.
        policy: The code this site allows (``fedpeft client --allow-remote-code/--allow-plugin``);
            default: none, so a job with ``trust_remote_code`` or a plugin file is refused.
        noise_key: This site's secret, mixed into the seed of its DP noise
            (:func:`fedpeft.privacy.client_level.private_seed`); ``None``: the server's seed alone.
    """

    def __init__(self, name: str, data_path: str | Path, device: str = "",
                 policy: SitePolicy | None = None, noise_key: bytes | None = None) -> None:
        self.name, self.data_path, self.device, self.noise_key = name, str(data_path), device, noise_key
        self.policy = policy or SitePolicy()
        self._worker: tuple[str, Worker] | None = None
        self._examples: tuple[str, list[TokenizedExample]] | None = None
        self._feedback = ErrorFeedback()  # top-k's residual: kept here, in memory (lost on restart)
        self._lock = threading.Lock()

    def train(self, config: Mapping[str, Any], state: Arrays) -> tuple[int, dict, str, Arrays]:
        """Train from ``state`` as the server's ``config`` (site, seed, job) says.

        Returns:
            ``(num_examples, metrics, client_id, new_state)``.

        Raises:
            ConfigError: if the request is meant for another site or the job cannot be read.
            SiteRefusal: if the job asks for code this site did not allow (nothing is loaded).
            DataError: if the site's file is unusable.
        """
        if str(config[C.KEY_SITE]) != self.name:
            raise ConfigError(f"the server sent site {config[C.KEY_SITE]!r}'s task to site "
                              f"{self.name!r}; do two sites share a name or a key?")
        cfg, holdout = site_job_from_payload(str(config[C.KEY_JOB]))
        check_job(cfg, self.policy, self.name)  # before any model or plugin is loaded
        if config.get(C.KEY_TASK) == C.TASK_EVALUATE:
            return self.evaluate(cfg, holdout, config, state)
        with self._lock:
            worker = self._worker_for(cfg)
            examples = self._examples_for(cfg, holdout, worker)
            check_privacy(cfg, self.policy, self.name, secure=bool(config.get(C.KEY_SECURE, False)),
                          num_examples=len(examples), shares=int(config.get(C.KEY_SHARES, 1)))
            log.info("site %s: round %s, %d examples on %s", self.name,
                     config.get(C.KEY_SERVER_ROUND), len(examples), worker.device)
            link = Link.from_config(cfg.federation.compression)
            rank = int(config[C.KEY_RANK]) if C.KEY_RANK in config else None
            shapes = {n: p.shape for n, p in trainable_parameters(worker.model).items()}
            received, global_state = link.client_start(state, shapes, rank)
            seed = int(config[C.KEY_SEED])
            if cfg.privacy.level != "none" and self.noise_key:  # noise the coordinator cannot recompute
                seed = private_seed(seed, self.noise_key)
            update = fit(worker.model, examples, cfg.train, global_state, seed=seed,
                         pad_token_id=worker.tokenizer.pad_token_id, client_id=self.name, progress=False,
                         privacy=cfg.privacy, rounds=cfg.federation.rounds,
                         shares=int(config.get(C.KEY_SHARES, 1)))
            arrays = link.client_reply(received, update.state, rank, self._feedback)  # top-k: this site's residual
        return update.num_examples, update.metrics, update.client_id, arrays

    def evaluate(self, cfg: JobConfig, holdout: bool, config: Mapping[str, Any],
                 state: Arrays) -> tuple[int, dict, str, Arrays]:
        """Score the global ``state`` (or, zero-shot, the base model) on this site's own slice.

        Only numbers leave: ``(slice size, metrics, site, {})``; the questions and answers stay here.

        Raises:
            ConfigError: if the job holds out no slice (``data.client_test_ratio`` is 0).
        """
        if not cfg.data.client_test_ratio:
            raise ConfigError("the server asked for per-site scores, but its job has data.client_test_ratio 0")
        with self._lock:
            worker = self._worker_for(cfg)
            rows = site_data(cfg, self.data_path, holdout)[1]
            start = None if config.get(C.KEY_ZERO_SHOT) else {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
            log.info("site %s: scoring round %s on its own %d held-out rows", self.name,
                     config.get(C.KEY_SERVER_ROUND), len(rows))
            train = self._examples_for(cfg, holdout, worker) if cfg.eval.site_finetune_steps else None
            scores = score_site(worker, start, cfg, rows, train, int(config.get(C.KEY_SEED, 0)))
        return scores.pop(KEY_N), scores, self.name, {}

    def _worker_for(self, cfg) -> Worker:
        device = self.device or resolve_devices(cfg.model.devices)[0]
        key = json.dumps([cfg.model.model_dump(mode="json"), cfg.peft.model_dump(mode="json"),
                          cfg.seed, device], sort_keys=True)
        if self._worker is None or self._worker[0] != key:
            self._worker = (key, build_worker(cfg, device))
            self._examples, self._feedback = None, ErrorFeedback()
        return self._worker[1]

    def _examples_for(self, cfg, holdout: bool, worker: Worker) -> list[TokenizedExample]:
        key = json.dumps([cfg.data.model_dump(mode="json"), holdout, cfg.seed], sort_keys=True)
        if self._examples is None or self._examples[0] != key:
            rows = site_rows(cfg, self.data_path, holdout)
            d = cfg.data
            self._examples = (key, tokenize_examples(worker.tokenizer, rows, d.max_seq_len, d.system_prompt))
        return self._examples[1]
