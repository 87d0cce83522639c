"""What the server tells a site about the job, and how a site turns its file into training rows.

The server sends, with every training message, the parts of the job config a site needs to
train exactly like client ``i`` of the simulation: the model, the PEFT method, the training
hyperparameters, how to read and tokenise rows, and the seed. It never sends data paths: a site
names its own file (``fedpeft client --data``), and the server never learns it.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedpeft.config import JobConfig
from fedpeft.data.federated import client_file_rows, client_share, site_split  # the simulation's: rows match
from fedpeft.data.io import load_examples
from fedpeft.errors import ConfigError

# Data keys that name files on the server: never sent to a site.
_SERVER_ONLY_DATA_KEYS = ("train", "test", "client_files", "max_test_samples")
_SITE_EVAL_KEYS = ("batch_size", "max_new_tokens", "repetition_penalty", "metrics", "heldout_loss", "merge_lora",
                   "site_max_samples", "site_finetune_steps")
HOLDOUT = "holdout"  # True: the site holds out test_ratio of its rows, as the simulation does


def site_job_payload(cfg: JobConfig) -> str:
    """The JSON text a site needs to train (no paths, no federation or eval settings).

    Args:
        cfg: The server's job config.

    Returns:
        JSON with ``seed``, ``model``, ``peft``, ``train``, ``privacy``, ``federation`` (clients,
        rounds, clients per round, compression on the wire), ``data`` (without file names) and
        ``holdout``: whether sites hold out ``test_ratio`` of their rows. The simulation does
        that when ``data.test`` is unset, so the deployment must too for the same result. Its
        ``data.max_train_samples`` is one site's share of the job's total
        (:func:`fedpeft.data.federated.client_share`): a site does not know how many there are.
    """
    dumped = cfg.model_dump(mode="json")
    data = {k: v for k, v in dumped["data"].items() if k not in _SERVER_ONLY_DATA_KEYS}
    data["max_train_samples"] = client_share(cfg)
    payload = {k: dumped[k] for k in ("seed", "model", "peft", "train", "privacy")}
    # what differential privacy needs: each site calibrates and checks its budget over the rounds
    federation = {k: dumped["federation"][k] for k in ("num_clients", "rounds", "clients_per_round", "compression")}
    ev = {k: v for k, v in dumped["eval"].items() if k in _SITE_EVAL_KEYS}  # scoring its own slice
    payload.update(data=data, federation=federation, eval=ev, **{HOLDOUT: cfg.data.test is None})
    return json.dumps(payload, sort_keys=True)


def site_job_from_payload(text: str) -> tuple[JobConfig, bool]:
    """Rebuild the job config a site trains with from :func:`site_job_payload`'s text.

    Returns:
        ``(cfg, holdout)``; ``cfg``'s data paths are defaults and must not be used.

    Raises:
        ConfigError: if the text is not a job this fedpeft version understands.
    """
    try:
        payload = json.loads(text)
        holdout = bool(payload.pop(HOLDOUT))
        return JobConfig.model_validate(payload), holdout
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"the server sent a job this site cannot read ({e}); are the server "
                          "and the site running the same fedpeft version?") from e


def site_rows(cfg: JobConfig, path: str | Path, holdout: bool) -> list[dict]:
    """The training rows of one site, as the simulation builds them from ``client_files[i]``.

    Args:
        cfg: The job (from :func:`site_job_from_payload`; its ``data.max_train_samples`` is this
            site's share).
        path: The site's own JSONL file.
        holdout: Hold out ``data.test_ratio`` of the rows (by ``data.split_by``) like the
            simulation does when the job has no ``data.test``.

    Raises:
        DataError: if the file is unusable (the message names file and line; it stays on the site).
    """
    return site_data(cfg, path, holdout)[0]


def site_data(cfg: JobConfig, path: str | Path, holdout: bool) -> tuple[list[dict], list[dict]]:
    """``(training rows, own test slice)`` of one site, as the simulation builds its client's.

    The slice (``data.client_test_ratio``; empty when 0) stays on the site: it scores it itself.
    """
    d = cfg.data
    rows = load_examples(path, d.question_field, d.answer_field)
    train = client_file_rows(rows, d, cfg.seed, holdout, d.max_train_samples)[0]  # the site's share
    return site_split(train, d, cfg.seed, f"site {Path(path).name}")
