"""Per-round checkpoints: everything needed to continue a run exactly where it stopped, verified.

``checkpoints/round-NNNN/`` holds the global adapter (safetensors), the server optimizer state
(e.g. FedAvgM momentum) and RNG states, and ``checkpoint.json`` with the round number, the
SHA-256 of every other file and the run's fingerprints (resolved config, data). Each folder is
written atomically; ``checkpoints/latest`` names the newest one and is updated last, so a crash
mid-write leaves the previous checkpoint in force. On load every file is checked against its
checksum: a flipped byte, a truncated or empty file, or a ``latest`` pointing at a missing
round makes the loader fall back to the newest checkpoint that verifies, with a warning naming
what it skipped. Only the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
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
from fedpeft.errors import CheckpointError
from fedpeft.io_utils import atomic_path, write_json, write_text
from fedpeft.state import State

log = logging.getLogger(__name__)

_ROUND_DIR = re.compile(r"^round-(\d{4,})$")


@dataclass
class Checkpoint:
    round: int
    global_state: State
    server_state: dict[str, Any]
    meta: dict[str, Any]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(run_dir: Path, rnd: int, global_state: State, server_state: dict[str, Any],
                    meta: dict[str, Any] | None = None, keep: int | None = None) -> Path:
    """Write the checkpoint of round ``rnd``, point ``latest`` at it, keep the newest ``keep``."""
    name = f"round-{rnd:04d}"
    root = run_dir / CHECKPOINT_DIR
    with atomic_path(root / name) as tmp:
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in global_state.items()}, str(tmp / CHECKPOINT_STATE_FILE))
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        torch.save({"server": server_state, "rng": rng}, tmp / CHECKPOINT_SERVER_OPT_FILE)
        files = {f: _sha256(tmp / f) for f in (CHECKPOINT_STATE_FILE, CHECKPOINT_SERVER_OPT_FILE)}
        write_json(tmp / CHECKPOINT_META_FILE, {"round": rnd, "sha256": files, **(meta or {})})
    write_text(root / LATEST_CHECKPOINT_FILE, name + "\n")
    if keep:
        for old in _round_dirs(root)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    return root / name


def _round_dirs(root: Path) -> list[Path]:
    """``round-NNNN`` folders, newest first."""
    dirs = [p for p in root.iterdir() if p.is_dir() and _ROUND_DIR.match(p.name)] if root.is_dir() else []
    return sorted(dirs, key=lambda p: int(_ROUND_DIR.match(p.name).group(1)), reverse=True)


def _verify(folder: Path) -> dict[str, Any]:
    """The folder's metadata, once every file matches its checksum.

    Raises:
        CheckpointError: saying what is missing, unreadable or changed.
    """
    meta_file = folder / CHECKPOINT_META_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{folder.name}: no {CHECKPOINT_META_FILE}")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{folder.name}: {CHECKPOINT_META_FILE} is not valid JSON ({e})") from e
    sums = meta.get("sha256")
    if not isinstance(sums, dict) or set(sums) != {CHECKPOINT_STATE_FILE, CHECKPOINT_SERVER_OPT_FILE}:
        raise CheckpointError(f"{folder.name}: {CHECKPOINT_META_FILE} lists no checksums (written by an older fedpeft?)")
    for name, expected in sums.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder.name}: {name} is missing")
        if _sha256(path) != expected:
            raise CheckpointError(f"{folder.name}: {name} does not match its checksum (changed or truncated)")
    return meta


def _remove_leftovers(root: Path) -> None:
    """Temporary folders of checkpoint writes that were killed (``.round-NNNN.xxxx``)."""
    for p in root.glob(".round-*") if root.is_dir() else []:
        log.info("removing %s, left by an interrupted checkpoint write", p)
        shutil.rmtree(p, ignore_errors=True)


def _candidates(root: Path) -> list[Path]:
    """``latest`` first (if it names a folder), then every round folder, newest first."""
    latest = root / LATEST_CHECKPOINT_FILE
    named = root / latest.read_text().strip() if latest.is_file() else None
    dirs = _round_dirs(root)
    if named is not None and not named.is_dir():
        log.warning("checkpoints/latest names %s, which does not exist; using the newest checkpoint that verifies",
                    named.name)
    return ([named] if named in dirs else []) + [d for d in dirs if d != named]


def load_latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest checkpoint of ``run_dir`` that verifies, or None if it has none.

    Raises:
        CheckpointError: if checkpoints exist but none verifies.
    """
    root = run_dir / CHECKPOINT_DIR
    _remove_leftovers(root)
    candidates, skipped = _candidates(root), []
    for folder in candidates:
        try:
            meta = _verify(folder)
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", folder, e)
            skipped.append(str(e))
            continue
        blob = torch.load(folder / CHECKPOINT_SERVER_OPT_FILE, weights_only=True)
        torch.set_rng_state(blob["rng"]["torch"])
        random.setstate(_as_random_state(blob["rng"]["python"]))
        return Checkpoint(int(meta["round"]), load_file(str(folder / CHECKPOINT_STATE_FILE)), blob["server"], meta)
    if candidates or (root / LATEST_CHECKPOINT_FILE).is_file():
        raise CheckpointError(f"no checkpoint of {run_dir} verifies ({'; '.join(skipped) or 'none left'}); the run "
                              "cannot be resumed exactly. Start it again, or restore the folder from a backup.")
    return None


def _as_random_state(state: Any) -> tuple:
    """``random.setstate`` wants tuples; a round trip through ``torch.load`` may give lists."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
