"""Per-site scores: the global adapter on each client's own held-out slice.

With ``data.client_test_ratio`` each client holds out part of its own rows
(:func:`fedpeft.data.federated.site_split`). At every evaluation (and zero-shot, before round 1)
the round loop asks its pool to score the global adapter on every slice: the simulation does it
on its worker, a deployed site does it itself and sends only the numbers (Flower's evaluate
message), never its questions or predictions. The scores use the job's evaluation settings with
``eval.site_max_samples`` questions generated per site (0: held-out loss only).

With ``eval.site_finetune_steps: k`` each site also trains the global adapter ``k`` local steps
on its own training rows (the job's ``train`` settings; no DP: this adapter never leaves the
site) and scores its slice again, as ``personal/<metric>``: the personalised arm (a few local
steps on the global adapter). Its seed is :func:`personal_seed`, the same on a site and in the
simulation.

A round's record gets ``sites: {client: {n, metric: value}}`` and its ``eval`` the summary
``site_mean/<metric>`` (each site counts once, whatever its size: the consortium's view) and
``site_worst/<metric>`` (the highest loss, the lowest score).
"""

from __future__ import annotations

import math

import numpy as np

from fedpeft.config import JobConfig
from fedpeft.data.prompts import TokenizedExample
from fedpeft.constants import EVAL_MEASUREMENTS, KEY_HELDOUT_LOSS
from fedpeft.state import State
from fedpeft.trainer import fit
from fedpeft.worker import Worker, evaluate_global

KEY_SITES = "sites"
PERSONAL = "personal/"
KEY_N = "n"
LOWER_IS_BETTER = (KEY_HELDOUT_LOSS,)
_NOT_SCORES = (KEY_N, *EVAL_MEASUREMENTS)


def site_eval_config(cfg: JobConfig) -> JobConfig:
    """``cfg`` with the evaluation a site runs on its slice (``site_max_samples`` questions, no MCQ file)."""
    ev = cfg.eval.model_copy(update={"max_samples": cfg.eval.site_max_samples, "mcq": None})
    return cfg.model_copy(update={"eval": ev})


def personal_seed(cfg: JobConfig, rnd: int, index: int) -> int:
    """Seed of client ``index``'s personalisation steps after round ``rnd`` (distinct from its training seeds)."""
    return int(np.random.SeedSequence([cfg.seed, rnd, index, 1]).generate_state(1, np.uint64)[0] >> 1)


def score_site(worker: Worker, state: State | None, cfg: JobConfig, rows: list[dict],
               train: list[TokenizedExample] | None = None, seed: int = 0) -> dict:
    """``{n, metric: value}`` of ``state`` (``None``: the base model) on one site's slice ``rows``;
    with ``eval.site_finetune_steps`` and ``train`` (the site's tokenized rows), ``personal/<metric>`` too."""
    site_cfg = site_eval_config(cfg)
    metrics, _ = evaluate_global(worker, state, site_cfg, rows)
    scores = {KEY_N: len(rows), **metrics}
    steps = cfg.eval.site_finetune_steps
    if steps and state is not None and train:
        epochs = math.ceil(steps * cfg.train.batch_size * cfg.train.grad_accum / len(train))  # enough to reach k steps
        local = cfg.train.model_copy(update={"max_steps": steps, "local_epochs": max(epochs, 1)})
        personal = fit(worker.model, train, local, state, seed=seed, pad_token_id=worker.tokenizer.pad_token_id,
                       client_id="personalised", progress=False).state
        own, _ = evaluate_global(worker, personal, site_cfg, rows)
        scores.update({f"{PERSONAL}{k}": v for k, v in own.items() if k not in EVAL_MEASUREMENTS})
    return scores


def summarize(per_site: dict[str, dict]) -> dict[str, float]:
    """``site_mean/<metric>`` (unweighted: one site, one vote) and ``site_worst/<metric>`` over the sites."""
    if not per_site:
        return {}
    keys = [k for k, v in next(iter(per_site.values())).items() if k not in _NOT_SCORES and isinstance(v, float)]
    out = {}
    for key in keys:
        values = [s[key] for s in per_site.values() if key in s]
        out[f"site_mean/{key}"] = sum(values) / len(values)
        out[f"site_worst/{key}"] = (max if key.removeprefix(PERSONAL) in LOWER_IS_BETTER else min)(values)
    return out
