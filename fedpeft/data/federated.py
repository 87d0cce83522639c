"""Assemble a job's data: train/test rows and one partition per client, before any tokenizer.

Three ways to give clients their data: partition one training set (``iid``, ``dirichlet``,
``by_field``, ...), or ``data.client_files`` with one file per site (the real-world case, where
each hospital brings its own file).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from fedpeft.config import JobConfig
from fedpeft.data.io import load_client_files, load_examples, resolve_source
from fedpeft.data.partitioners import partition_rows, partition_summary
from fedpeft.data.split import split_rows

log = logging.getLogger(__name__)


@dataclass
class FederatedData:
    """Rows per client (``client-0`` ...), the test rows, and the per-client size summary."""

    client_ids: list[str]
    client_rows: list[list[dict]]
    test_rows: list[dict]
    summary: list[dict]


def cap_rows(rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    """A seeded random subset of at most ``limit`` rows (all rows, in order, if no limit)."""
    if limit is None or len(rows) <= limit:
        return rows
    idx = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in idx]


def prepare_data(cfg: JobConfig) -> FederatedData:
    """Load, split, cap and partition the job's data as its config says.

    Raises:
        DataError: for unreadable files, bad rows, or an empty client partition.
    """
    d, fed = cfg.data, cfg.federation
    fields = {"question_field": d.question_field, "answer_field": d.answer_field}
    if d.client_files:
        parts = [cap_rows(rows, d.max_train_samples, cfg.seed) for rows in load_client_files(d.client_files, **fields)]
        test = load_examples(d.test, **fields) if d.test else []
        if not d.test:  # each site holds out part of its own file; the union is the test set
            split = [split_rows(rows, d.test_ratio, cfg.seed, d.split_by) for rows in parts]
            parts, test = [s[0] for s in split], [r for s in split for r in s[1]]
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
    field = fed.partition.params.get("field")
    return FederatedData(
        client_ids=[f"client-{i}" for i in range(len(parts))],
        client_rows=parts,
        test_rows=test,
        summary=partition_summary(parts, field),
    )
