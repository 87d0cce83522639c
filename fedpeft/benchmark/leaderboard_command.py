"""``fedpeft leaderboard``: print the leaderboards of the benchmark jobs under a folder again."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from fedpeft.benchmark.leaderboard import PRIVACY_COLUMNS, build_board, default_direction, print_board, select
from fedpeft.benchmark.constants import PLAN_FILE
from fedpeft.errors import ConfigError
from fedpeft.problems import did_you_mean


def job_dirs(workspace: Path) -> list[Path]:
    """``workspace`` if it is a job folder, else the job folders directly inside it (sorted)."""
    workspace = Path(workspace)
    if (workspace / PLAN_FILE).is_file():
        return [workspace]
    return sorted(p.parent for p in workspace.glob(f"*/{PLAN_FILE}"))


def parse_sort_by(items: list[str] | None) -> list[tuple[str, str]] | None:
    """``["rougeL", "heldout_loss:ascend"]`` -> ``[("rougeL", "descend"), ("heldout_loss", "ascend")]``."""
    if not items:
        return None
    out = []
    for item in items:
        name, _, direction = item.partition(":")
        direction = direction or default_direction(name)
        if direction not in ("ascend", "descend"):
            raise ConfigError(f"--sort-by {item!r}: direction must be ascend or descend")
        out.append((name, direction))
    return out


def print_leaderboards(workspace: str | Path, sort_by: list[str] | None = None, show_all: bool = False,
                       console: Console | None = None) -> int:
    """Print the leaderboard of every job under ``workspace`` (``fedpeft leaderboard``).

    Raises:
        ConfigError: if there is no job, or ``sort_by`` names no column.
    """
    dirs = job_dirs(Path(workspace))
    if not dirs:
        raise ConfigError(f"no benchmark job under {workspace} (looked for {PLAN_FILE} in it and its sub-folders)")
    keys = parse_sort_by(sort_by)
    for job_dir in dirs:
        board, meta = build_board(job_dir, keys)
        for name, _ in keys or []:
            if name in PRIVACY_COLUMNS and name not in board.columns:
                raise ConfigError(f"--sort-by {name}: no test case of {job_dir} trained with differential "
                                  "privacy (add a privacy: section to the job), so every epsilon is ∞")
            if name not in board.columns:
                raise ConfigError(f"--sort-by {name!r}: no such column{did_you_mean(name, board.columns)} "
                                  f"Columns: {', '.join(board.columns)}")
        shown = board if show_all else select(board, meta)
        print_board(shown, f"{meta['name']}: leaderboard ({job_dir})", console)
    return 0
