"""Save the global adapter as a folder ``peft.PeftModel.from_pretrained`` loads, and load it back."""

from __future__ import annotations

import json
from pathlib import Path

from peft import PeftModel

from fedpeft.adapters import set_trainable_state
from fedpeft.config import JobConfig, ModelConfig
from fedpeft.io_utils import atomic_path
from fedpeft.models import load_base_model
from fedpeft.types import State

MODEL_INFO_FILE = "fedpeft_model.json"


def save_adapter(model: PeftModel, state: State, out: Path, cfg: JobConfig) -> None:
    """Write ``state`` as a PEFT adapter folder (plus the base model's fedpeft config)."""
    set_trainable_state(model, state)
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        info = {"model": cfg.model.model_dump(mode="json"), "peft": {"method": cfg.peft.method, **cfg.peft.params}}
        (tmp / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2))


def load_adapter(adapter_dir: str | Path, device: str = "cpu") -> tuple[PeftModel, object]:
    """Load the base model named in ``adapter_dir`` with the adapter on top (inference mode)."""
    adapter_dir = Path(adapter_dir)
    info_file = adapter_dir / MODEL_INFO_FILE
    if not info_file.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a fedpeft adapter folder (no {MODEL_INFO_FILE})")
    info = json.loads(info_file.read_text())
    base, tok = load_base_model(ModelConfig(**info["model"]), device)
    return PeftModel.from_pretrained(base, adapter_dir), tok
