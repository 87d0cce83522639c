"""The one Markdown table writer: cells as given, pipes escaped, alignment marks."""

from __future__ import annotations

import pytest

from fedpeft.tables import markdown_table


def test_cells_are_kept_as_written_and_columns_line_up():
    text = markdown_table(["method", "ROUGE-L"], [["FedAvg", "0.300"], ["zero-shot", "1e-3"]])
    assert text.splitlines() == [
        "| method    | ROUGE-L   |",
        "|:----------|:----------|",
        "| FedAvg    | 0.300     |",  # not parsed as a number: 0.300 stays 0.300
        "| zero-shot | 1e-3      |",
    ]


def test_a_pipe_in_a_cell_cannot_split_it_and_alignment_is_marked():
    lines = markdown_table(["a|b", "n"], [["x|y", "7"]], align=["left", "right"]).splitlines()
    assert lines[0].startswith("| a\\|b") and lines[2].startswith("| x\\|y")
    assert lines[1].endswith("--:|") and lines[1].startswith("|:-")
    assert [line.count("|") - line.count("\\|") for line in lines] == [3, 3, 3]


def test_alignment_must_name_one_known_value_per_column():
    with pytest.raises(ValueError, match="one of left, right, center per column"):
        markdown_table(["a", "b"], [], align=["left"])
    with pytest.raises(ValueError, match="got \\['left', 'up'\\]"):
        markdown_table(["a", "b"], [], align=["left", "up"])
