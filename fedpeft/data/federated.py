"""Assemble a job's data: train/test rows and one partition per client, before any tokenizer.

Three ways to give clients their data: partition one training set (``iid``, ``dirichlet``,
``by_field``, ...), or ``data.client_files`` with one file per site (the real-world case, where
each hospital brings its own file).

``data.max_train_samples`` means the same in both cases: at most that many training rows in
total over all clients, a seeded subset taken after the test rows are held out. One training
set is capped, then partitioned; with ``client_files`` each client keeps
``max_train_samples // num_clients`` rows of its own file (:func:`client_share`), which a
deployed site can apply without seeing the other files.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from fedpeft.audit.canary import make_canaries, plant
from fedpeft.config import DataConfig, JobConfig
from fedpeft.data.io import load_client_files, load_examples, resolve_source
from fedpeft.data.partitioners import partition_rows, partition_summary
from fedpeft.data.split import split_rows
from fedpeft.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class FederatedData:
    """Rows per client (``client-0`` ...), the test rows, and the per-client size summary.

    ``client_test_rows``: each client's own held-out slice (``data.client_test_ratio``), for
    per-site scores; empty lists (or none at all) when the job asks for none. ``site_ids`` names
    the slices when they are not the clients' (the centralised baseline: one client, every site's slice).
    """

    client_ids: list[str]
    client_rows: list[list[dict]]
    test_rows: list[dict]
    summary: list[dict]
    client_test_rows: list[list[dict]] = field(default_factory=list)
    site_ids: list[str] = field(default_factory=list)


def cap_rows(rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    """A seeded random subset of at most ``limit`` rows (all rows, in order, if no limit)."""
    if limit is None or len(rows) <= limit:
        return rows
    idx = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in idx]


def client_share(cfg: JobConfig) -> int | None:
    """Training rows each client keeps with ``data.client_files``: its share of the total cap."""
    cap = cfg.data.max_train_samples
    return None if cap is None else cap // cfg.federation.num_clients  # validation: cap >= num_clients


def client_file_rows(rows: list[dict], data: DataConfig, seed: int, holdout: bool,
                     cap: int | None) -> tuple[list[dict], list[dict]]:
    """One client's ``(train, test)`` rows from its own file: hold out the test rows, then cap.

    Args:
        rows: The rows of the client's file.
        data: The job's data settings (``test_ratio``, ``split_by``).
        seed: The job's seed.
        holdout: Hold out ``test_ratio`` of the rows (the job has no ``data.test``).
        cap: The client's share of ``max_train_samples`` (:func:`client_share`).
    """
    train, test = split_rows(rows, data.test_ratio, seed, data.split_by) if holdout else (rows, [])
    return cap_rows(train, cap, seed), test


def site_split(rows: list[dict], data: DataConfig, seed: int, client: str) -> tuple[list[dict], list[dict]]:
    """One client's ``(train, own test slice)``: ``data.client_test_ratio`` of its rows held out.

    The same function, seed and rows in the simulation and on a deployed site give the same slice.
    The slice is taken from the client's training rows after the caps (and before any canary).

    Raises:
        DataError: if the slice or the rest would be empty (the message names the client).
    """
    if not data.client_test_ratio:
        return rows, []
    try:
        return split_rows(rows, data.client_test_ratio, seed, data.split_by)
    except DataError as e:
        raise DataError(f"{client}: data.client_test_ratio={data.client_test_ratio} cannot hold out a slice of its "
                        f"{len(rows)} rows ({e}); give it more rows or lower the ratio") from None


def plant_canaries(cfg: JobConfig, parts: list[list[dict]]) -> list[list[dict]]:
    """``parts`` with ``audit.canaries`` canaries planted ``audit.repetitions`` times into client ``audit.client``."""
    audit = cfg.audit
    if not audit.canaries:
        return parts
    planted, _ = make_canaries(audit, cfg.seed)
    parts = list(parts)
    parts[audit.client] = plant(parts[audit.client], planted, audit.repetitions, cfg.seed)
    log.info("audit: planted %d canary rows (%d canaries x %d) into client-%d", audit.canaries * audit.repetitions,
             audit.canaries, audit.repetitions, audit.client)
    return parts


def prepare_data(cfg: JobConfig) -> FederatedData:
    """Load, split, cap and partition the job's data as its config says.

    Raises:
        DataError: for unreadable files, bad rows, or an empty client partition.
    """
    d, fed = cfg.data, cfg.federation
    fields = {"question_field": d.question_field, "answer_field": d.answer_field}
    if d.client_files:  # without data.test each site holds out part of its file; the union is the test set
        split = [client_file_rows(rows, d, cfg.seed, not d.test, client_share(cfg))
                 for rows in load_client_files(d.client_files, **fields)]
        parts = [train for train, _ in split]
        test = load_examples(d.test, **fields) if d.test else [r for _, held in split for r in held]
    else:
        rows = resolve_source(d.train, **fields)
        if d.test:
            train, test = rows, load_examples(d.test, **fields)
        else:
            train, test = split_rows(rows, d.test_ratio, cfg.seed, d.split_by)
        train = cap_rows(train, d.max_train_samples, cfg.seed)
        p = fed.partition
        parts = partition_rows(train, fed.num_clients, cfg.seed, p.method, p.params)
    test = cap_rows(test, d.max_test_samples, cfg.seed + 1)
    sliced = [site_split(rows, d, cfg.seed, f"client-{i}") for i, rows in enumerate(parts)]
    parts, slices = [train for train, _ in sliced], [held for _, held in sliced]
    parts = plant_canaries(cfg, parts)  # after the splits and the caps: never in test rows
    group = fed.partition.params.get("field")
    return FederatedData(
        client_ids=[f"client-{i}" for i in range(len(parts))],
        client_rows=parts,
        test_rows=test,
        summary=partition_summary(parts, group),
        client_test_rows=slices if d.client_test_ratio else [],
    )
