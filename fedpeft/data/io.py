"""Load question/answer examples from JSONL files, the built-in sample, or the Hugging Face Hub.

Every loader returns a list of dicts with the keys ``question`` and ``answer`` (stripped, never
empty) plus every other field of the original record (``qtype``, ``focus``, ``source``...),
which partitioners and ``data.split_by`` use. Errors are :class:`DataError` naming the file and
the 1-based line, what was found there and how to fix it.

The question and answer fields are detected once per source, on its first record, as the first
of :data:`FIELD_PAIRS` present; ``data.question_field`` / ``data.answer_field`` override that.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fedpeft.errors import DataError

log = logging.getLogger(__name__)

FIELD_PAIRS: tuple[tuple[str, str], ...] = (
    ("question", "answer"),
    ("instruction", "response"),
    ("input", "output"),
    ("Question", "Answer"),
)
SAMPLE_PATH = Path(__file__).with_name("sample.jsonl")
BUILTIN_PREFIX = "builtin:"
HF_PREFIX = "hf:"
BUILTIN_SOURCES: dict[str, Path] = {"sample": SAMPLE_PATH}
# Hub data sets whose field names are known (the generic detection would find these too).
KNOWN_HF_FIELDS: dict[str, tuple[str, str]] = {
    "keivalya/MedQuad-MedicalQnADataset": ("Question", "Answer"),  # other field: qtype
}
_CONFIG_KEY = {"question": "data.question_field", "answer": "data.answer_field"}


def resolve_input(value: str, base_dir: str | os.PathLike, label: str | None = None) -> str:
    """Where a relative input path named in a YAML file points: beside that file, else here.

    The rule of every config file (native jobs and both benchmark formats): a relative path is
    looked up beside the file that names it first, then in the working directory. When it is in
    neither place, the path beside the file is returned (the error that follows names it).

    Args:
        value: The path as written; ``builtin:...`` and ``hf:...`` values and absolute paths
            are returned unchanged (``~`` is expanded).
        base_dir: The folder of the file that names the path.
        label: The key, e.g. ``data.train``; given, the choice is logged (INFO).

    Returns:
        An absolute path, or ``value`` itself.
    """
    if value.startswith((BUILTIN_PREFIX, HF_PREFIX)):
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    folder = os.path.abspath(base_dir)
    beside, here = os.path.join(folder, path), os.path.abspath(path)
    if os.path.exists(beside):
        chosen, where = beside, f"found beside the file, in {folder}"
    elif os.path.exists(here):
        chosen, where = here, f"found in the working directory, not in {folder}"
    else:
        chosen, where = beside, f"not found in {folder} nor in the working directory {os.getcwd()}"
    if label:
        log.info("%s: %s -> %s (%s)", label, value, os.path.normpath(chosen), where)
    return os.path.normpath(chosen)


def load_examples(
    path: str | os.PathLike,
    question_field: str | None = None,
    answer_field: str | None = None,
    max_rows: int | None = None,
) -> list[dict]:
    """Read a JSONL file of question/answer records (one JSON object per line).

    Args:
        path: The JSONL file. Blank lines are skipped; a UTF-8 byte order mark is accepted.
        question_field: Field holding the question; ``None`` detects it (see :data:`FIELD_PAIRS`).
        answer_field: Field holding the answer; ``None`` detects it.
        max_rows: Keep only the first ``max_rows`` records.

    Returns:
        One dict per record: ``question``, ``answer`` and the record's other fields.

    Raises:
        DataError: if the file is missing or empty, or a line is not a JSON object or lacks a
            non-empty question or answer; the message names ``file:line``.
    """
    _check_max_rows(max_rows)
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise DataError(f"data file {what}: {path}; expected a JSONL file with one "
                        '{"question": ..., "answer": ...} object per line')
    return _to_examples(read_objects(path), str(path), question_field, answer_field, max_rows)


def resolve_source(
    spec: str,
    question_field: str | None = None,
    answer_field: str | None = None,
    max_rows: int | None = None,
) -> list[dict]:
    """Load the examples named by a ``data.train`` value.

    Args:
        spec: A JSONL path, ``builtin:sample`` (the shipped sample, see ``SAMPLE_NOTICE.md``),
            or ``hf:<dataset id>`` (its ``train`` split, through the ``datasets`` library).
        question_field: As in :func:`load_examples`.
        answer_field: As in :func:`load_examples`.
        max_rows: As in :func:`load_examples`.

    Returns:
        The examples, as :func:`load_examples` returns them.

    Raises:
        DataError: if the source is unknown or cannot be read.
    """
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_SOURCES:
            valid = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_SOURCES)
            raise DataError(f"unknown built-in data set {spec!r}; built-in data sets: {valid}")
        return load_examples(BUILTIN_SOURCES[name], question_field, answer_field, max_rows)
    if spec.startswith(HF_PREFIX):
        return load_hf_dataset(spec[len(HF_PREFIX):], question_field, answer_field, max_rows)
    return load_examples(spec, question_field, answer_field, max_rows)


def load_hf_dataset(
    dataset_id: str,
    question_field: str | None = None,
    answer_field: str | None = None,
    max_rows: int | None = None,
) -> list[dict]:
    """Load the ``train`` split of a Hugging Face Hub data set with the ``datasets`` library.

    Args:
        dataset_id: The hub id, e.g. ``keivalya/MedQuad-MedicalQnADataset``.
        question_field: As in :func:`load_examples`; defaults to :data:`KNOWN_HF_FIELDS`.
        answer_field: As in :func:`load_examples`; defaults to :data:`KNOWN_HF_FIELDS`.
        max_rows: As in :func:`load_examples`.

    Returns:
        The examples, as :func:`load_examples` returns them (locations read ``hf:<id> row N``).

    Raises:
        DataError: if ``datasets`` is not installed, the data set cannot be loaded (unknown id,
            no network), or a record lacks a question or answer.
    """
    _check_max_rows(max_rows)
    source = HF_PREFIX + dataset_id
    if not dataset_id.strip():
        raise DataError(f"{source!r}: give a data set id after 'hf:', e.g. 'hf:keivalya/MedQuad-MedicalQnADataset'")
    datasets = _import_datasets(source)
    known = KNOWN_HF_FIELDS.get(dataset_id, (None, None))
    try:
        ds = datasets.load_dataset(dataset_id, split="train")
    except Exception as e:  # noqa: BLE001 - network, hub and file errors all mean "cannot load"
        raise DataError(
            f"could not load Hugging Face data set {dataset_id!r} (split 'train'): "
            f"{type(e).__name__}: {e}. Check the id and the network connection; offline, use a "
            "data set already in the Hugging Face cache (HF_DATASETS_OFFLINE=1) or a JSONL file "
            "as data.train."
        ) from e
    records = ((f"{source} row {i}", dict(row)) for i, row in enumerate(ds, 1))
    return _to_examples(records, source, question_field or known[0], answer_field or known[1], max_rows)


def load_client_files(
    paths: Sequence[str | os.PathLike],
    question_field: str | None = None,
    answer_field: str | None = None,
    max_rows: int | None = None,
) -> list[list[dict]]:
    """Load one JSONL file per client (``data.client_files``: each site brings its own data).

    Args:
        paths: One JSONL file per client, in client order.
        question_field: As in :func:`load_examples`, for every file.
        answer_field: As in :func:`load_examples`, for every file.
        max_rows: Keep at most this many records of each file.

    Returns:
        The examples of each client, in the order of ``paths``.

    Raises:
        DataError: if ``paths`` is empty or any file is unusable (see :func:`load_examples`).
    """
    if not paths:
        raise DataError("data.client_files is empty; list one JSONL file per client")
    return [load_examples(p, question_field, answer_field, max_rows) for p in paths]


def detect_fields(
    record: dict, question_field: str | None, answer_field: str | None, location: str
) -> tuple[str, str]:
    """The ``(question, answer)`` field names to use for ``record``.

    Given names win; a missing one is taken from the first pair of :data:`FIELD_PAIRS` whose
    fields are both in ``record``.

    Raises:
        DataError: if no pair matches; the message lists the record's fields.
    """
    if question_field and answer_field:
        return question_field, answer_field
    for q, a in FIELD_PAIRS:
        q, a = question_field or q, answer_field or a
        if q in record and a in record:
            return q, a
    pairs = ", ".join(f"{q}/{a}" for q, a in FIELD_PAIRS)
    raise DataError(
        f"{location}: cannot tell which fields hold the question and the answer; this line has "
        f"fields {_field_list(record)}. Expected one of the pairs {pairs}, or set "
        "data.question_field and data.answer_field (e.g. data.question_field=prompt)."
    )


def row_label(row: dict, index: int) -> str:
    """How errors name a loaded row: its index, and its ``id`` field when it has one."""
    return f"row at index {index} (id {row['id']!r})" if "id" in row else f"row at index {index}"


def field_values(rows: Sequence[dict], field: str, hint: str = "") -> list[Any]:
    """The value of ``field`` in every row (lists and mappings as canonical JSON text).

    Args:
        rows: Loaded examples.
        field: The field to read.
        hint: Appended to the error message (how to choose another field).

    Raises:
        DataError: if a row lacks ``field`` or holds ``null`` there; names the row's index and id.
    """
    values: list[Any] = []
    for i, row in enumerate(rows):
        value = row.get(field)
        if value is None:
            raise DataError(f"{row_label(row, i)} has no field {field!r}; its fields: "
                            f"{_field_list(row)}.{' ' + hint if hint else ''}")
        values.append(json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value)
    return values


# --------------------------------------------------------------------------------------------
# Helpers


def _check_max_rows(max_rows: int | None) -> None:
    if max_rows is not None and max_rows < 1:
        raise DataError(f"max_rows must be >= 1 or None, got {max_rows}")


def _import_datasets(source: str) -> Any:
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"data.train={source!r} needs the 'datasets' library, which is not installed: "
            "pip install datasets. Or save the data set as JSONL (one object per line) and set "
            "data.train to that file."
        ) from e
    return datasets


def _field_list(record: dict) -> str:
    return ", ".join(repr(k) for k in record) if record else "(none)"


def read_objects(path: Path) -> Iterator[tuple[str, dict]]:
    """Yield ``("file:line", object)`` for every non-blank line of a JSONL file."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            location = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{location}: not valid UTF-8 ({e.reason}); save the file as UTF-8") from e
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{location}: invalid JSON ({e.msg} at column {e.colno}); each line must be one "
                    'JSON object such as {"question": "...", "answer": "..."}'
                ) from e
            if not isinstance(obj, dict):
                raise DataError(f"{location}: expected a JSON object with a question and an answer, "
                                f"got a JSON {type(obj).__name__}")
            yield location, obj


def _to_examples(
    records: Iterable[tuple[str, dict]],
    source: str,
    question_field: str | None,
    answer_field: str | None,
    max_rows: int | None,
) -> list[dict]:
    fields: tuple[str, str] | None = None
    examples: list[dict] = []
    for location, record in records:
        if fields is None:  # detected once, so every record of a source reads the same fields
            fields = detect_fields(record, question_field, answer_field, location)
        examples.append(_normalise(record, fields, location))
        if max_rows is not None and len(examples) >= max_rows:
            break
    if not examples:
        raise DataError(f"{source}: no rows (empty, or only blank lines); expected one JSON object "
                        "per line with a question and an answer")
    return examples


def _normalise(record: dict, fields: tuple[str, str], location: str) -> dict:
    """``question`` and ``answer`` (stripped text) plus the record's other fields."""
    texts: dict[str, str] = {}
    for role, name in zip(("question", "answer"), fields):
        value = record.get(name)
        fix = f"this line has fields {_field_list(record)}; set {_CONFIG_KEY[role]} to the field holding the {role}"
        if value is None:
            raise DataError(f"{location}: missing {role} field {name!r}; {fix}")
        if not isinstance(value, str):
            raise DataError(f"{location}: {role} field {name!r} must be text, got a JSON "
                            f"{type(value).__name__}; {fix}")
        if not value.strip():
            raise DataError(f"{location}: {role} field {name!r} is empty; fill it in or drop the line ({fix})")
        texts[role] = value.replace("\r\n", "\n").strip()
    rest = {k: v for k, v in record.items() if k not in fields}
    return {**rest, **texts}
