"""Seeded train/test splits, optionally keeping every value of a field on one side.

With ``group_field`` (``data.split_by``, e.g. ``focus``) whole groups go to one side, so the test
set asks about topics the model never trained on: a harder and more honest test than a random
row split, where near-duplicate questions about one topic land on both sides.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.constants import SPLIT_TEST_FILE, SPLIT_TRAIN_FILE
from fedpeft.data.io import field_values, load_examples
from fedpeft.errors import DataError
from fedpeft.io_utils import write_jsonl

log = logging.getLogger(__name__)

_REQUIRED_FIELDS = ("question", "answer")


def split_rows(
    rows: Sequence[dict], test_ratio: float, seed: int, group_field: str | None = None
) -> tuple[list[dict], list[dict]]:
    """Split ``rows`` into train and test, reproducibly for a given ``seed``.

    Without ``group_field`` the test side gets ``round(len(rows) * test_ratio)`` random rows,
    except that rows asking the same question (:func:`question_key`) stay on one side, with a
    warning giving how many questions repeat: a duplicated row on both sides would be a test
    question the model was trained on.
    With it, groups are taken in seeded random order and each is put on the test side when that
    brings the test size closer to ``len(rows) * test_ratio``. Both sides keep the input order.

    Args:
        rows: Loaded examples.
        test_ratio: Fraction of rows for the test side, in (0, 1).
        seed: Seed of the shuffle.
        group_field: Keep all rows with one value of this field on the same side.

    Returns:
        ``(train, test)``.

    Raises:
        DataError: if a side would be empty, there are fewer than 2 groups, or a row lacks
            ``group_field``.
    """
    if not 0 < test_ratio < 1:
        raise DataError(f"test_ratio must be in (0, 1), got {test_ratio}")
    if group_field is None:
        test_idx = _question_test_indices(rows, test_ratio, seed)
    else:
        test_idx = _group_test_indices(rows, test_ratio, seed, group_field)
    train = [r for i, r in enumerate(rows) if i not in test_idx]
    test = [r for i, r in enumerate(rows) if i in test_idx]
    for side, part in (("train", train), ("test", test)):
        if not part:
            by = f" keeping each {group_field!r} value on one side" if group_field else ""
            bigger = "smaller" if side == "train" else "larger"
            raise DataError(f"splitting {len(rows)} rows with test_ratio={test_ratio}{by} leaves the "
                            f"{side} side empty; use a {bigger} test_ratio or more rows")
    return train, test


def split_file(
    in_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    test_ratio: float,
    seed: int,
    drop_fields: Sequence[str] = (),
    group_field: str | None = None,
    question_field: str | None = None,
    answer_field: str | None = None,
) -> dict[str, Any]:
    """Split a JSONL file into ``out_dir/train.jsonl`` and ``out_dir/test.jsonl`` (atomically).

    Records are written normalised: ``question``, ``answer`` and their other fields.

    Args:
        in_path: The JSONL file (see :func:`fedpeft.data.io.load_examples`).
        out_dir: Folder for the two files; created if missing.
        test_ratio: Fraction of rows for the test side, in (0, 1).
        seed: Seed of the split.
        drop_fields: Fields removed from the written records (e.g. ``source``), after splitting.
        group_field: Keep each value of this field on one side (see :func:`split_rows`).
        question_field: As in :func:`fedpeft.data.io.load_examples`.
        answer_field: As in :func:`fedpeft.data.io.load_examples`.

    Returns:
        ``{"train": n, "test": m, "train_path": str, "test_path": str}``.

    Raises:
        DataError: if the file is unusable, a side would be empty, or ``drop_fields`` names
            ``question``/``answer`` or a field no row has.
    """
    rows = load_examples(in_path, question_field, answer_field)
    _check_drop_fields(rows, drop_fields)
    train, test = split_rows(rows, test_ratio, seed, group_field)
    out = Path(out_dir)
    train_path, test_path = out / SPLIT_TRAIN_FILE, out / SPLIT_TEST_FILE
    write_jsonl(train_path, _without(train, drop_fields))
    write_jsonl(test_path, _without(test, drop_fields))
    return {"train": len(train), "test": len(test), "train_path": str(train_path), "test_path": str(test_path)}


def _random_test_indices(n: int, test_ratio: float, seed: int) -> set[int]:
    n_test = round(n * test_ratio)
    order = np.random.default_rng(seed).permutation(n)
    return {int(i) for i in order[:n_test]}


def question_key(row: dict) -> str:
    """The question text two rows must share to be the same question (stripped, casefolded)."""
    return " ".join(str(row["question"]).split()).casefold()


def _question_test_indices(rows: Sequence[dict], test_ratio: float, seed: int) -> set[int]:
    """Random rows, but every copy of a repeated question on one side (no train/test leak).

    Without repeats this is the plain seeded row split (same rows as before for the same seed).
    """
    groups = _groups([question_key(r) for r in rows])
    repeated = sum(1 for members in groups.values() if len(members) > 1)
    if not repeated:
        return _random_test_indices(len(rows), test_ratio, seed)
    log.warning("%d questions appear in more than one row (%d rows in all); each is kept on one side of "
                "the train/test split so no test question is also trained on", repeated,
                sum(len(m) for m in groups.values() if len(m) > 1))
    if len(groups) < 2:
        raise DataError(f"all {len(rows)} rows ask the same question; need at least 2 different questions "
                        "to hold some out for testing")
    return _pick_groups(groups, test_ratio * len(rows), seed)


def _groups(values: Sequence[Any]) -> dict[Any, list[int]]:
    groups: dict[Any, list[int]] = {}
    for i, value in enumerate(values):
        groups.setdefault(value, []).append(i)
    return groups


def _group_test_indices(rows: Sequence[dict], test_ratio: float, seed: int, field: str) -> set[int]:
    values = field_values(rows, field, hint="Fill it in, or set data.split_by to another field (or null).")
    groups = _groups(values)
    if len(groups) < 2:
        raise DataError(f"data.split_by={field!r}: every row has the same value {values[0]!r}; "
                        "need at least 2 values to hold some out; use another field or none")
    return _pick_groups(groups, test_ratio * len(rows), seed)


def _pick_groups(groups: dict[Any, list[int]], target: float, seed: int) -> set[int]:
    """Whole groups, in seeded random order, each taken when it brings the test size closer to target."""
    keys = sorted(groups, key=str)  # fixed order before the seeded shuffle
    test: set[int] = set()
    for k in np.random.default_rng(seed).permutation(len(keys)):
        members = groups[keys[k]]
        if abs(len(test) + len(members) - target) < abs(len(test) - target):
            test.update(members)
    return test


def _check_drop_fields(rows: list[dict], drop_fields: Sequence[str]) -> None:
    required = [f for f in drop_fields if f in _REQUIRED_FIELDS]
    if required:
        raise DataError(f"cannot drop {required}: every record needs 'question' and 'answer'")
    present = {k for row in rows for k in row}
    unknown = [f for f in drop_fields if f not in present]
    if unknown:
        raise DataError(f"fields to drop {unknown} are in no row; fields present: {sorted(present)}")


def _without(rows: list[dict], drop_fields: Sequence[str]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in drop_fields} for row in rows]
