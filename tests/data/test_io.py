"""JSONL loading: field detection, normalisation, sources, and errors that name file:line."""

from __future__ import annotations

import json
import re
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from fedpeft.data.io import (
    FIELD_PAIRS,
    SAMPLE_PATH,
    field_values,
    load_client_files,
    load_examples,
    resolve_source,
)
from fedpeft.errors import DataError


def write_lines(tmp_path: Path, lines: list[str], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def at(path: Path, line: int) -> str:
    """Regex for the ``file:line`` prefix of an error."""
    return re.escape(f"{path}:{line}")


def qa(q: str = "What is it?", a: str = "A thing.", **extra: object) -> str:
    return json.dumps({"question": q, "answer": a, **extra})


# --------------------------------------------------------------------------------------------
# Field detection and normalisation


@pytest.mark.parametrize(("q_field", "a_field"), FIELD_PAIRS)
def test_detects_each_known_field_pair(tmp_path: Path, q_field: str, a_field: str) -> None:
    path = write_lines(tmp_path, [json.dumps({q_field: " Why? ", a_field: "Because.\n", "topic": "t"})])
    assert load_examples(path) == [{"question": "Why?", "answer": "Because.", "topic": "t"}]


def test_first_matching_pair_wins(tmp_path: Path) -> None:
    record = {"input": "ctx", "output": "out", "question": "Q?", "answer": "A."}
    rows = load_examples(write_lines(tmp_path, [json.dumps(record)]))
    assert rows == [{"input": "ctx", "output": "out", "question": "Q?", "answer": "A."}]


def test_explicit_fields_override_detection(tmp_path: Path) -> None:
    record = {"prompt": "Q?", "completion": "A.", "question": "other", "answer": "other"}
    rows = load_examples(write_lines(tmp_path, [json.dumps(record)]), "prompt", "completion")
    assert rows[0]["question"] == "Q?" and rows[0]["answer"] == "A."
    assert "prompt" not in rows[0] and "completion" not in rows[0]


def test_one_explicit_field_detects_the_other(tmp_path: Path) -> None:
    rows = load_examples(write_lines(tmp_path, [json.dumps({"prompt": "Q?", "response": "A."})]), "prompt")
    assert rows == [{"question": "Q?", "answer": "A."}]


def test_extra_fields_are_kept_and_source_fields_replaced(tmp_path: Path) -> None:
    record = {"qtype": "symptoms", "Question": "Q?", "Answer": "A.", "meta": {"k": [1, 2]}}
    rows = load_examples(write_lines(tmp_path, [json.dumps(record)]))
    assert rows == [{"qtype": "symptoms", "meta": {"k": [1, 2]}, "question": "Q?", "answer": "A."}]


def test_blank_lines_skipped_and_max_rows(tmp_path: Path) -> None:
    path = write_lines(tmp_path, ["", qa("one?"), "   ", qa("two?"), qa("three?"), ""])
    assert [r["question"] for r in load_examples(path)] == ["one?", "two?", "three?"]
    assert [r["question"] for r in load_examples(path, max_rows=2)] == ["one?", "two?"]


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes("\ufeff".encode() + qa("Ça va?").encode() + b"\n")
    assert load_examples(path)[0]["question"] == "Ça va?"


# --------------------------------------------------------------------------------------------
# Errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not found: .*nope\.jsonl"):
        load_examples(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("lines", [[], ["", "  "]])
def test_empty_file(tmp_path: Path, lines: list[str]) -> None:
    path = write_lines(tmp_path, lines)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: no rows"):
        load_examples(path)


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path, [qa(), "", '{"question": "x", "answer": '])
    with pytest.raises(DataError, match=rf"{at(path, 3)}: invalid JSON"):
        load_examples(path)


def test_not_an_object(tmp_path: Path) -> None:
    path = write_lines(tmp_path, [qa(), '["a", "b"]'])
    with pytest.raises(DataError, match=rf"{at(path, 2)}: expected a JSON object.*got a JSON list"):
        load_examples(path)


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(qa().encode() + b"\n" + '{"question": "caf\xe9?", "answer": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"{at(path, 2)}: not valid UTF-8"):
        load_examples(path)


def test_missing_answer_lists_fields_and_config_key(tmp_path: Path) -> None:
    path = write_lines(tmp_path, [qa(), json.dumps({"question": "Q?", "reply": "A."})])
    with pytest.raises(DataError) as err:
        load_examples(path)
    message = str(err.value)
    assert f"{path}:2: missing answer field 'answer'" in message
    assert "'question', 'reply'" in message and "data.answer_field" in message


@pytest.mark.parametrize(("record", "role"), [({"question": "  \n", "answer": "A."}, "question"),
                                              ({"question": "Q?", "answer": ""}, "answer")])
def test_empty_field(tmp_path: Path, record: dict, role: str) -> None:
    path = write_lines(tmp_path, [qa(), qa(), json.dumps(record)])
    with pytest.raises(DataError, match=rf"{at(path, 3)}: {role} field '{role}' is empty.*data\.{role}_field"):
        load_examples(path)


def test_non_text_field(tmp_path: Path) -> None:
    path = write_lines(tmp_path, [json.dumps({"question": "Q?", "answer": 42})])
    with pytest.raises(DataError, match=rf"{at(path, 1)}: answer field 'answer' must be text, got a JSON int"):
        load_examples(path)


def test_undetectable_fields(tmp_path: Path) -> None:
    path = write_lines(tmp_path, ["", json.dumps({"prompt": "Q?", "completion": "A."})])
    with pytest.raises(DataError, match=rf"{at(path, 2)}: cannot tell.*'prompt', 'completion'.*data\.question_field"):
        load_examples(path)


def test_detection_is_per_file_so_later_rows_must_match(tmp_path: Path) -> None:
    path = write_lines(tmp_path, [qa(), json.dumps({"instruction": "Q?", "response": "A."})])
    with pytest.raises(DataError, match=rf"{at(path, 2)}: missing question field 'question'.*'instruction'"):
        load_examples(path)


def test_field_values_names_the_row(tmp_path: Path) -> None:
    rows = [{"id": "a", "source": "x"}, {"id": "b"}]
    assert field_values(rows[:1], "source") == ["x"]
    with pytest.raises(DataError, match=r"row at index 1 \(id 'b'\) has no field 'source'.*Try X"):
        field_values(rows, "source", hint="Try X.")


# --------------------------------------------------------------------------------------------
# Sources


def test_resolve_source_path_and_builtin(tmp_path: Path) -> None:
    assert resolve_source(str(write_lines(tmp_path, [qa()])))[0]["answer"] == "A thing."
    assert len(resolve_source("builtin:sample", max_rows=5)) == 5
    with pytest.raises(DataError, match=r"unknown built-in data set 'builtin:medquad'.*builtin:sample"):
        resolve_source("builtin:medquad")


def test_hf_source_maps_medquad_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []

    def load_dataset(name: str, split: str) -> list[dict]:
        calls.append((name, split))
        return [{"qtype": "symptoms", "Question": " Q1? ", "Answer": "A1."},
                {"qtype": "treatment", "Question": "Q2?", "Answer": "A2."}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    rows = resolve_source("hf:keivalya/MedQuad-MedicalQnADataset", max_rows=1)
    assert calls == [("keivalya/MedQuad-MedicalQnADataset", "train")]
    assert rows == [{"qtype": "symptoms", "question": "Q1?", "answer": "A1."}]


def test_hf_source_bad_row_is_located(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.SimpleNamespace(load_dataset=lambda name, split: [{"Question": "Q", "Answer": "A"},
                                                                    {"Question": "Q", "Answer": " "}])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError, match=r"hf:some/set row 2: answer field 'Answer' is empty"):
        resolve_source("hf:some/set")


def test_hf_source_without_datasets_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match=r"needs the 'datasets' library.*pip install datasets"):
        resolve_source("hf:keivalya/MedQuad-MedicalQnADataset")


def test_hf_source_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_dataset(name: str, split: str) -> list[dict]:
        raise ConnectionError("couldn't reach huggingface.co")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError, match=r"could not load .*'org/set'.*ConnectionError.*JSONL file"):
        resolve_source("hf:org/set")


def test_load_client_files(tmp_path: Path) -> None:
    a = write_lines(tmp_path, [qa("a1?"), qa("a2?")], "site_a.jsonl")
    b = write_lines(tmp_path, [json.dumps({"instruction": "b1?", "response": "B."})], "site_b.jsonl")
    clients = load_client_files([a, b])
    assert [[r["question"] for r in rows] for rows in clients] == [["a1?", "a2?"], ["b1?"]]
    with pytest.raises(DataError, match="client_files is empty"):
        load_client_files([])
    with pytest.raises(DataError, match="not found"):
        load_client_files([a, tmp_path / "missing.jsonl"])


# --------------------------------------------------------------------------------------------
# The shipped sample


def test_sample_has_the_documented_fields() -> None:
    rows = load_examples(SAMPLE_PATH)
    assert len(rows) == 80
    assert all(set(r) == {"id", "source", "focus", "qtype", "question", "answer"} for r in rows)
    assert len({r["id"] for r in rows}) == 80 and len({r["question"] for r in rows}) == 80
    assert {r["qtype"] for r in rows} == {"information", "symptoms", "treatment", "causes", "prevention"}
    per_focus = Counter(r["focus"] for r in rows)
    assert len(per_focus) == 25 and all(2 <= n <= 4 for n in per_focus.values())
    per_source = Counter(r["source"] for r in rows)
    assert set(per_source) == {"cardiology", "endocrinology", "neurology", "infectious"}
    assert len(set(per_source.values())) == 4  # unequal site sizes
    sources_of_focus: dict[str, set[str]] = {}
    for r in rows:
        sources_of_focus.setdefault(r["focus"], set()).add(r["source"])
    assert all(len(s) == 1 for s in sources_of_focus.values())  # a topic belongs to one site


def test_sample_notice_ships_beside_the_sample() -> None:
    notice = SAMPLE_PATH.with_name("SAMPLE_NOTICE.md").read_text(encoding="utf-8")
    assert "not medical advice" in notice.lower()
