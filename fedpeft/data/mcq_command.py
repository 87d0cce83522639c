"""``fedpeft data mcq``: an offline answer-selection task made from MedQuAD rows.

Each question gets its own answer and ``distractors`` answers to questions of the same ``qtype``
(symptoms, treatment...) about other topics (``focus``): the options read alike, so choosing
means knowing which disease they describe. Answers that also occur under the question's own
focus are never distractors. Everything is drawn from one seeded generator in file order, so a
seed gives the same file; a row whose ``qtype`` has too few answers on other topics is skipped
(the log counts them by ``qtype``).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from itertools import islice
from typing import Any

import numpy as np

from fedpeft.data.io import field_values, load_examples
from fedpeft.data.mcq_io import McqItem
from fedpeft.errors import DataError
from fedpeft.io_utils import write_jsonl

log = logging.getLogger(__name__)

_HINT = "`fedpeft data mcq` needs MedQuAD-like rows with 'qtype' and 'focus' fields."
_KEPT_FIELDS = ("id", "qtype", "focus", "source")  # written beside the item, for per-type analysis


class _Pool:
    """The distinct answers of one ``qtype``, in file order, and which of them each focus gave."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.index: dict[str, int] = {}
        self.by_focus: dict[Any, set[int]] = {}

    def add(self, text: str, focus: Any) -> None:
        i = self.index.setdefault(text, len(self.texts))
        if i == len(self.texts):
            self.texts.append(text)
        self.by_focus.setdefault(focus, set()).add(i)

    def other_topics(self, focus: Any) -> int:
        """How many answers never given under ``focus``."""
        return len(self.texts) - len(self.by_focus.get(focus, ()))

    def draw(self, focus: Any, k: int, rng: np.random.Generator) -> list[str]:
        banned = self.by_focus.get(focus, set())
        return [self.texts[j] for j in islice((j for j in rng.permutation(len(self.texts)) if j not in banned), k)]


def make_items(rows: Sequence[dict], *, distractors: int = 3, seed: int = 0,
               max_items: int | None = None) -> tuple[list[dict], Counter]:
    """Answer-selection items from MedQuAD-like rows (see the module docstring).

    Args:
        rows: Loaded examples with ``question``, ``answer``, ``qtype`` and ``focus``.
        distractors: Wrong options per item.
        seed: Seed of the rows kept (``max_items``), the distractors drawn and the option order.
        max_items: Build items for this many rows at most, a seeded random subset kept in file
            order; distractors still come from every row.

    Returns:
        ``(records, skipped)``: each record is an item (:meth:`McqItem.to_json`) plus the row's
        ``id``, ``qtype``, ``focus`` and ``source`` where present; ``skipped`` counts skipped
        rows by ``qtype``.

    Raises:
        DataError: if a row lacks ``qtype`` or ``focus``, or ``distractors`` is below 1.
    """
    if distractors < 1:
        raise DataError(f"--distractors must be >= 1, got {distractors}")
    qtypes = field_values(rows, "qtype", hint=_HINT)
    foci = field_values(rows, "focus", hint=_HINT)
    pools: dict[Any, _Pool] = {}
    for row, qtype, focus in zip(rows, qtypes, foci):
        pools.setdefault(qtype, _Pool()).add(row["answer"], focus)
    rng = np.random.default_rng(seed)
    chosen = range(len(rows))
    if max_items is not None and max_items < len(rows):
        chosen = sorted(int(i) for i in rng.choice(len(rows), size=max_items, replace=False))
    records, skipped = [], Counter()
    for i in chosen:
        pool = pools[qtypes[i]]
        if pool.other_topics(foci[i]) < distractors:
            skipped[qtypes[i]] += 1
            continue
        options = [rows[i]["answer"], *pool.draw(foci[i], distractors, rng)]
        order = rng.permutation(len(options))
        item = McqItem(rows[i]["question"], tuple(options[j] for j in order), int(np.flatnonzero(order == 0)[0]))
        records.append({**item.to_json(), **{k: rows[i][k] for k in _KEPT_FIELDS if k in rows[i]}})
    return records, skipped


def mcq_file(in_path: str | os.PathLike, out_path: str | os.PathLike, *, distractors: int = 3, seed: int = 0,
             max_items: int | None = None) -> dict[str, Any]:
    """Write :func:`make_items` of a JSONL file of MedQuAD rows to ``out_path`` (atomically).

    Returns:
        ``{"items": n, "skipped": m, "out": str}``.

    Raises:
        DataError: if the input is unusable or yields no item.
    """
    rows = load_examples(in_path)
    records, skipped = make_items(rows, distractors=distractors, seed=seed, max_items=max_items)
    if skipped:
        log.info("skipped %d rows whose qtype has fewer than %d answers on other topics: %s", sum(skipped.values()),
                 distractors, ", ".join(f"{q}: {n}" for q, n in sorted(skipped.items(), key=str)))
    if not records:
        raise DataError(f"{in_path}: no row has {distractors} answers of its qtype on other topics; "
                        "use more rows or fewer --distractors")
    write_jsonl(out_path, records)
    return {"items": len(records), "skipped": sum(skipped.values()), "out": str(out_path)}
