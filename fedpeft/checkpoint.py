"""Per-round checkpoints: everything needed to continue a run exactly where it stopped.

``checkpoints/round-NNNN/`` holds the global adapter (safetensors), the server optimizer state
(e.g. FedAvgM momentum) and RNG states, and ``checkpoint.json`` with the round number. Each is
written atomically; ``checkpoints/latest`` names the newest complete one and is updated last,
so a crash mid-write leaves the previous checkpoint in force.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedpeft.constants import (
    CHECKPOINT_DIR,
    CHECKPOINT_META_FILE,
    CHECKPOINT_SERVER_OPT_FILE,
    CHECKPOINT_STATE_FILE,
    LATEST_CHECKPOINT_FILE,
)
from fedpeft.io_utils import atomic_path, write_json, write_text
from fedpeft.state import State


@dataclass
class Checkpoint:
    round: int
    global_state: State
    server_state: dict[str, Any]
    meta: dict[str, Any]


def save_checkpoint(run_dir: Path, rnd: int, global_state: State, server_state: dict[str, Any],
                    meta: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint of round ``rnd`` and point ``latest`` at it."""
    name = f"round-{rnd:04d}"
    target = run_dir / CHECKPOINT_DIR / name
    with atomic_path(target) as tmp:
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in global_state.items()}, str(tmp / CHECKPOINT_STATE_FILE))
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        torch.save({"server": server_state, "rng": rng}, tmp / CHECKPOINT_SERVER_OPT_FILE)
        write_json(tmp / CHECKPOINT_META_FILE, {"round": rnd, **(meta or {})})
    write_text(run_dir / CHECKPOINT_DIR / LATEST_CHECKPOINT_FILE, name + "\n")
    return target


def load_latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint of ``run_dir``, or None if it has none."""
    latest = run_dir / CHECKPOINT_DIR / LATEST_CHECKPOINT_FILE
    if not latest.is_file():
        return None
    folder = run_dir / CHECKPOINT_DIR / latest.read_text().strip()
    meta = json.loads((folder / CHECKPOINT_META_FILE).read_text())
    blob = torch.load(folder / CHECKPOINT_SERVER_OPT_FILE, weights_only=False)
    torch.set_rng_state(blob["rng"]["torch"])
    random.setstate(blob["rng"]["python"])
    state = load_file(str(folder / CHECKPOINT_STATE_FILE))
    return Checkpoint(int(meta["round"]), state, blob["server"], meta)
