"""Multiple-choice items: one JSONL format of our own, and readers for the medical benchmarks.

An item is ``{"question": str, "options": [str, ...], "answer": int}`` (``answer`` indexes
``options``); other fields (``id``, ``qtype``...) are kept in the file and ignored here. The
format of a file is detected on its first record and every later record must have it too:

========== ===================================================== ==============================
format     fields                                                answer
========== ===================================================== ==============================
fedpeft    ``question``, ``options`` (list), ``answer``          index into ``options``
pubmedqa   ``question``/``QUESTION``, optional ``context`` /     ``final_decision``: yes, no or
           ``CONTEXTS`` (text, list, or ``{"contexts": [...]}``) maybe (options in that order)
medmcqa    ``question``, ``opa`` .. ``opd``                      ``cop``: 0-3 (the hub's export)
medqa      ``question``, ``options`` (``{"A": ...}`` or a list   ``answer_idx``: a letter
           of ``{"key", "value"}``)
careqa     ``question``, ``op1`` .. ``op4``                      ``cop``: 1-4, as CareQA numbers
========== ===================================================== ==============================

A PubMedQA context (the abstract) is put before its question, as FlowerTune's PubMedQA evaluation
does. Files are parsed once per version (path, size, modification time): a job reads its items
every round.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.data.io import read_objects
from fedpeft.errors import DataError

PUBMEDQA_OPTIONS = ("yes", "no", "maybe")
_MEDMCQA_KEYS = ("opa", "opb", "opc", "opd")
_CAREQA_KEYS = ("op1", "op2", "op3", "op4")


@dataclass(frozen=True)
class McqItem:
    """One question, its options, and the index of the right one."""

    question: str
    options: tuple[str, ...]
    answer: int

    def to_json(self) -> dict[str, Any]:
        """The item as a JSONL record of the ``fedpeft`` format."""
        return {"question": self.question, "options": list(self.options), "answer": self.answer}


def detect_format(record: dict) -> str | None:
    """The format of ``record`` (see the module docstring), or None if none matches."""
    if isinstance(record.get("options"), list) and "answer" in record and "answer_idx" not in record:
        return "fedpeft"
    if "final_decision" in record:
        return "pubmedqa"
    if "opa" in record and "cop" in record:
        return "medmcqa"
    if "op1" in record and "cop" in record:
        return "careqa"
    if "options" in record and "answer_idx" in record:
        return "medqa"
    return None


def _text(record: dict, key: str, what: str | None = None) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        found = "missing" if value is None else f"{type(value).__name__} {value!r}"[:80]
        raise ValueError(f"{what or repr(key)} must be non-empty text, got {found}")
    return value.strip()


def _index(value: Any, n: int, key: str, first: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not first <= value < first + n:
        raise ValueError(f"{key!r} must be an integer in {first}..{first + n - 1}, got {value!r}")
    return value - first


def _fedpeft(record: dict) -> McqItem:
    options = record["options"]
    if len(options) < 2:
        raise ValueError(f"'options' needs at least 2 entries, got {len(options)}")
    texts = tuple(_text({"o": o}, "o", f"option {i}") for i, o in enumerate(options))
    return McqItem(_text(record, "question"), texts, _index(record.get("answer"), len(texts), "answer"))


def _pubmedqa(record: dict) -> McqItem:
    question = _text(record, "question" if "question" in record else "QUESTION")
    context = record.get("context", record.get("CONTEXTS"))
    if isinstance(context, dict):  # the hub's pubmed_qa pqa_labeled: {"contexts": [...], "labels": ...}
        context = context.get("contexts")
    if isinstance(context, list):
        context = "\n".join(str(c) for c in context)
    decision = str(record.get("final_decision", "")).strip().lower()
    if decision not in PUBMEDQA_OPTIONS:
        raise ValueError(f"'final_decision' must be one of {', '.join(PUBMEDQA_OPTIONS)}, "
                         f"got {record.get('final_decision')!r}")
    full = f"{context.strip()}\n{question}" if isinstance(context, str) and context.strip() else question
    return McqItem(full, PUBMEDQA_OPTIONS, PUBMEDQA_OPTIONS.index(decision))


def _lettered(record: dict, keys: tuple[str, ...], first: int) -> McqItem:
    options = tuple(_text(record, k) for k in keys)
    cop = record.get("cop")
    if cop == -1:
        raise ValueError("'cop' is -1: no answer given (MedMCQA's test split hides its answers; "
                         "use its validation split, as FlowerTune does)")
    return McqItem(_text(record, "question"), options, _index(cop, len(keys), "cop", first))


def _medqa(record: dict) -> McqItem:
    raw = record["options"]
    if isinstance(raw, list):  # bigbio/med_qa source: [{"key": "A", "value": ...}, ...]
        raw = {o.get("key"): o.get("value") for o in raw if isinstance(o, dict)}
    if not isinstance(raw, dict) or len(raw) < 2:
        raise ValueError(f"'options' must map letters to option texts (A, B, ...), got {raw!r}"[:160])
    letters = sorted(raw)
    options = tuple(_text(raw, k, f"option {k!r}") for k in letters)
    letter = record.get("answer_idx")
    if letter not in raw:
        raise ValueError(f"'answer_idx' must be one of the option letters {', '.join(letters)}, got {letter!r}")
    return McqItem(_text(record, "question"), options, letters.index(letter))


_READERS: dict[str, Callable[[dict], McqItem]] = {
    "fedpeft": _fedpeft,
    "pubmedqa": _pubmedqa,
    "medmcqa": lambda r: _lettered(r, _MEDMCQA_KEYS, 0),
    "careqa": lambda r: _lettered(r, _CAREQA_KEYS, 1),
    "medqa": _medqa,
}
FORMATS = tuple(_READERS)


def load_mcq(path: str | os.PathLike, max_items: int | None = None) -> list[McqItem]:
    """Read multiple-choice items from a JSONL file of one of :data:`FORMATS`.

    Args:
        path: The JSONL file.
        max_items: Keep only the first ``max_items`` items.

    Returns:
        The items in file order.

    Raises:
        DataError: if the file is missing or empty, its format is none of :data:`FORMATS`, or a
            row is malformed; the message names ``file:line``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"multiple-choice file not found: {path}; expected a JSONL file of "
                        '{"question": ..., "options": [...], "answer": index} objects (see fedpeft data mcq)')
    items = _cached(str(path.resolve()), path.stat().st_mtime_ns, path.stat().st_size)
    return list(items[:max_items])


@functools.lru_cache(maxsize=8)
def _cached(path: str, mtime_ns: int, size: int) -> tuple[McqItem, ...]:
    """Every item of ``path``, parsed once per version of the file (jobs evaluate every round)."""
    fmt: str | None = None
    items: list[McqItem] = []
    for location, record in read_objects(Path(path)):
        if fmt is None:
            fmt = detect_format(record)
            if fmt is None:
                raise DataError(f"{location}: not a multiple-choice record of a known format ({', '.join(FORMATS)}); "
                                f"its fields: {', '.join(map(repr, record)) or '(none)'}. Expected e.g. "
                                '{"question": ..., "options": [...], "answer": index}')
        try:
            items.append(_READERS[fmt](record))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise DataError(f"{location}: {detail} (the file is read as {fmt} format, detected on its "
                            "first record)") from None
    if not items:
        raise DataError(f"{path}: no items (empty, or only blank lines)")
    return tuple(items)
