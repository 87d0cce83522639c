"""Seeded train/test splits, group-exclusive splits, and split_file's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpeft.constants import SPLIT_TEST_FILE as TEST_FILE
from fedpeft.constants import SPLIT_TRAIN_FILE as TRAIN_FILE
from fedpeft.data.io import SAMPLE_PATH, load_examples
from fedpeft.data.split import split_file, split_rows
from fedpeft.errors import DataError
from fedpeft.io_utils import read_jsonl


@pytest.fixture(scope="module")
def sample() -> list[dict]:
    return load_examples(SAMPLE_PATH)


def ids(rows: list[dict]) -> list[str]:
    return [r["id"] for r in rows]


def test_random_split_is_complete_disjoint_and_sized(sample: list[dict]) -> None:
    train, test = split_rows(sample, 0.2, seed=0)
    assert len(test) == 16 and len(train) == 64
    assert sorted(ids(train) + ids(test)) == sorted(ids(sample))
    assert ids(train) == [i for i in ids(sample) if i in set(ids(train))]  # input order kept


def test_random_split_is_reproducible(sample: list[dict]) -> None:
    assert split_rows(sample, 0.2, seed=3) == split_rows(sample, 0.2, seed=3)
    assert ids(split_rows(sample, 0.2, seed=3)[1]) != ids(split_rows(sample, 0.2, seed=4)[1])


def test_group_split_keeps_each_topic_on_one_side(sample: list[dict]) -> None:
    train, test = split_rows(sample, 0.2, seed=0, group_field="focus")
    train_topics, test_topics = {r["focus"] for r in train}, {r["focus"] for r in test}
    assert train_topics and test_topics and not train_topics & test_topics
    assert len(train) + len(test) == 80
    assert abs(len(test) - 16) <= 2  # closest to the ratio that whole topics (2-4 rows) allow
    assert split_rows(sample, 0.2, seed=0, group_field="focus") == (train, test)
    other = split_rows(sample, 0.2, seed=1, group_field="focus")[1]
    assert {r["focus"] for r in other} != test_topics


@pytest.mark.parametrize(("n", "ratio", "side"), [(5, 0.05, "test"), (3, 0.9, "train")])
def test_empty_side_is_an_error(n: int, ratio: float, side: str) -> None:
    rows = [{"question": f"q{i}", "answer": "a"} for i in range(n)]
    with pytest.raises(DataError, match=f"leaves the {side} side empty"):
        split_rows(rows, ratio, seed=0)


def test_group_split_with_one_group_is_an_error() -> None:
    rows = [{"question": f"q{i}", "answer": "a", "focus": "same"} for i in range(10)]
    with pytest.raises(DataError, match="every row has the same value 'same'"):
        split_rows(rows, 0.2, seed=0, group_field="focus")


def test_group_split_too_coarse_is_an_error() -> None:
    rows = [{"question": f"q{i}", "answer": "a", "focus": "big" if i < 9 else "small"} for i in range(10)]
    with pytest.raises(DataError, match="keeping each 'focus' value on one side leaves the test side empty"):
        split_rows(rows, 0.01, seed=0, group_field="focus")


def test_group_split_missing_field_names_the_row(sample: list[dict]) -> None:
    rows = [dict(r) for r in sample]
    del rows[7]["focus"]
    with pytest.raises(DataError, match=r"row at index 7 \(id 's08'\) has no field 'focus'.*data\.split_by"):
        split_rows(rows, 0.2, seed=0, group_field="focus")


def test_bad_ratio() -> None:
    with pytest.raises(DataError, match=r"test_ratio must be in \(0, 1\)"):
        split_rows([{"question": "q", "answer": "a"}] * 4, 1.0, seed=0)


def test_split_file_writes_both_sides(tmp_path: Path) -> None:
    out = tmp_path / "out" / "medqa"
    result = split_file(SAMPLE_PATH, out, 0.25, seed=0, drop_fields=["source"], group_field="focus")
    train, test = read_jsonl(out / TRAIN_FILE), read_jsonl(out / TEST_FILE)
    assert result == {"train": len(train), "test": len(test),
                      "train_path": str(out / TRAIN_FILE), "test_path": str(out / TEST_FILE)}
    assert len(train) + len(test) == 80 and len(test) > 0
    assert all("source" not in r and {"question", "answer", "focus"} <= set(r) for r in train + test)
    assert not {r["focus"] for r in train} & {r["focus"] for r in test}
    assert sorted(p.name for p in out.iterdir()) == [TEST_FILE, TRAIN_FILE]  # no temp files left
    split_file(SAMPLE_PATH, out, 0.25, seed=0, drop_fields=["source"], group_field="focus")
    assert read_jsonl(out / TEST_FILE) == test  # same seed, same files


def test_split_file_normalises_fields(tmp_path: Path) -> None:
    src = tmp_path / "raw.jsonl"
    src.write_text("".join(json.dumps({"Question": f" Q{i}? ", "Answer": "A.", "qtype": "t"}) + "\n"
                           for i in range(10)), encoding="utf-8")
    split_file(src, tmp_path, 0.3, seed=0)
    test = read_jsonl(tmp_path / TEST_FILE)
    assert len(test) == 3 and all(set(r) == {"question", "answer", "qtype"} for r in test)
    assert all(r["question"].startswith("Q") for r in test)


@pytest.mark.parametrize(("drop", "message"), [(["answer"], "cannot drop"), (["sourc"], r"in no row.*'source'")])
def test_split_file_bad_drop_fields(tmp_path: Path, drop: list[str], message: str) -> None:
    with pytest.raises(DataError, match=message):
        split_file(SAMPLE_PATH, tmp_path, 0.2, seed=0, drop_fields=drop)
    assert not (tmp_path / TRAIN_FILE).exists()


def _with_duplicates() -> list[dict]:
    """30 questions; the first 10 asked twice more (verbatim, and re-cased with stray spaces)."""
    rows = [{"question": f"What is condition {i}?", "answer": f"a{i}"} for i in range(30)]
    rows += [{"question": f"What is condition {i}?", "answer": f"b{i}"} for i in range(10)]
    rows += [{"question": f"  WHAT is condition {i}? ", "answer": f"c{i}"} for i in range(10)]
    return rows


@pytest.mark.parametrize("seed", range(5))
def test_duplicated_questions_never_land_on_both_sides(seed: int, caplog: pytest.LogCaptureFixture) -> None:
    rows = _with_duplicates()
    with caplog.at_level("WARNING", logger="fedpeft.data.split"):
        train, test = split_rows(rows, 0.3, seed=seed)
    norm = lambda side: {r["question"].strip().casefold() for r in side}  # noqa: E731
    assert not norm(train) & norm(test) and norm(test)
    assert len(train) + len(test) == 50 and abs(len(test) - 15) <= 2
    assert "10 questions appear in more than one row (30 rows in all)" in caplog.text


def test_split_file_keeps_duplicated_questions_on_one_side(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "dup.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _with_duplicates()))
    with caplog.at_level("WARNING", logger="fedpeft.data.split"):
        split_file(path, tmp_path / "out", 0.3, seed=0)
    train, test = read_jsonl(tmp_path / "out" / TRAIN_FILE), read_jsonl(tmp_path / "out" / TEST_FILE)
    assert not {r["question"].strip().casefold() for r in train} & {r["question"].strip().casefold() for r in test}
    assert "10 questions appear in more than one row" in caplog.text


def test_without_duplicates_no_warning_and_the_same_rows_as_a_plain_row_split(sample, caplog) -> None:
    with caplog.at_level("WARNING", logger="fedpeft.data.split"):
        train, test = split_rows(sample, 0.2, seed=0)
    assert "more than one row" not in caplog.text and len(test) == 16
