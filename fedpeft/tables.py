"""Markdown tables: the one writer behind ``rank/*.md`` and the bench scripts' tables.

A thin wrapper of ``tabulate``'s ``pipe`` format (GitHub-flavoured Markdown), for cells that
are already text: numbers are written exactly as formatted by the caller, and a ``|`` inside a
cell or header is escaped so it cannot split the cell.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tabulate import tabulate

ALIGNMENTS = ("left", "right", "center")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]],
                   align: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table of text cells, padded to line up in a text editor.

    Args:
        headers: Column headers.
        rows: One sequence of cells per row, as many as ``headers``.
        align: ``left``, ``right`` or ``center`` per column; ``None``: every column left.

    Returns:
        The table, one line per row, without a trailing newline.

    Raises:
        ValueError: if ``align`` has another length than ``headers`` or an unknown alignment.
    """
    if align is not None:
        bad = [a for a in align if a not in ALIGNMENTS]
        if len(align) != len(headers) or bad:
            raise ValueError(f"align must give one of {', '.join(ALIGNMENTS)} per column ({len(headers)} "
                             f"columns), got {list(align)}")
    cells = [[_escape(c) for c in row] for row in rows]
    return tabulate(cells, headers=[_escape(h) for h in headers], tablefmt="pipe",
                    disable_numparse=True, colalign=align)


def _escape(text: object) -> str:
    return str(text).replace("|", "\\|")
