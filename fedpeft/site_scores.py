"""Per-site scores: the global adapter on each client's own held-out slice.

With ``data.client_test_ratio`` each client holds out part of its own rows
(:func:`fedpeft.data.federated.site_split`). At every evaluation (and zero-shot, before round 1)
the round loop asks its pool to score the global adapter on every slice: the simulation does it
on its worker, a deployed site does it itself and sends only the numbers (Flower's evaluate
message), never its questions or predictions. The scores use the job's evaluation settings with
``eval.site_max_samples`` questions generated per site (0: held-out loss only).

A round's record gets ``sites: {client: {n, metric: value}}`` and its ``eval`` the summary
``site_mean/<metric>`` (each site counts once, whatever its size: the consortium's view) and
``site_worst/<metric>`` (the highest loss, the lowest score).
"""

from __future__ import annotations

from fedpeft.config import JobConfig
from fedpeft.constants import EVAL_MEASUREMENTS, KEY_HELDOUT_LOSS
from fedpeft.state import State
from fedpeft.worker import Worker, evaluate_global

KEY_SITES = "sites"
KEY_N = "n"
LOWER_IS_BETTER = (KEY_HELDOUT_LOSS,)
_NOT_SCORES = (KEY_N, *EVAL_MEASUREMENTS)


def site_eval_config(cfg: JobConfig) -> JobConfig:
    """``cfg`` with the evaluation a site runs on its slice (``site_max_samples`` questions, no MCQ file)."""
    ev = cfg.eval.model_copy(update={"max_samples": cfg.eval.site_max_samples, "mcq": None})
    return cfg.model_copy(update={"eval": ev})


def score_site(worker: Worker, state: State | None, cfg: JobConfig, rows: list[dict]) -> dict:
    """``{n, metric: value}`` of ``state`` (``None``: the base model) on one site's slice ``rows``."""
    metrics, _ = evaluate_global(worker, state, site_eval_config(cfg), rows)
    return {KEY_N: len(rows), **metrics}


def summarize(per_site: dict[str, dict]) -> dict[str, float]:
    """``site_mean/<metric>`` (unweighted: one site, one vote) and ``site_worst/<metric>`` over the sites."""
    if not per_site:
        return {}
    keys = [k for k, v in next(iter(per_site.values())).items() if k not in _NOT_SCORES and isinstance(v, float)]
    out = {}
    for key in keys:
        values = [s[key] for s in per_site.values() if key in s]
        out[f"site_mean/{key}"] = sum(values) / len(values)
        out[f"site_worst/{key}"] = (max if key in LOWER_IS_BETTER else min)(values)
    return out
