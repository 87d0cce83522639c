"""A trained adapter on disk: find it, read what the job saved with it, load it for inference.

A run writes its global adapter to ``RUN_DIR/adapter``: a PEFT adapter folder
(``adapter_config.json``, the weights) plus ``fedpeft_model.json``, which names the base model,
the PEFT method and ``data.prompt_template``. The job's system prompt and generation settings
(``data.system_prompt``, ``eval.max_new_tokens``, ``eval.repetition_penalty``) are read from the
same file where ``fedpeft export`` wrote them, else from the run's ``config.yaml`` beside it.
``fedpeft generate``, ``export``, ``chat`` and ``eval`` all open an adapter through :func:`open_adapter`
and load it through :func:`load_model` (``eval``: :func:`attach_adapter` onto one loaded base).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml
from peft import PeftConfig, PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedpeft.adapters import MODEL_INFO_FILE
from fedpeft.config import ModelConfig
from fedpeft.constants import CONFIG_FILE, FINAL_ADAPTER_DIR
from fedpeft.errors import ModelError

ADAPTER_CONFIG_FILE = "adapter_config.json"  # written by peft's save_pretrained
KEY_SYSTEM_PROMPT = "system_prompt"  # keys fedpeft export adds to fedpeft_model.json
KEY_GENERATION = "generation"


@dataclass(frozen=True)
class SavedAdapter:
    """What a saved adapter folder says about the job that trained it."""

    path: Path
    model: ModelConfig
    method: str
    prompt_learning: bool  # P-Tuning, prefix or prompt tuning: virtual tokens, nothing to merge
    prompt_template: str | None
    system_prompt: str | None
    max_new_tokens: int | None  # eval.max_new_tokens of the job; None when unknown
    repetition_penalty: float | None  # eval.repetition_penalty of the job; None when unknown

    def serving_settings(self) -> dict:
        """The job's system prompt and generation settings, as ``fedpeft export`` writes them."""
        return {KEY_SYSTEM_PROMPT: self.system_prompt,
                KEY_GENERATION: {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}}

    def info(self) -> dict:
        """The ``fedpeft_model.json`` of this adapter with :meth:`serving_settings` added."""
        return {**json.loads((self.path / MODEL_INFO_FILE).read_text()), **self.serving_settings()}


def adapter_folder(path: str | Path, flag: str = "--adapter") -> Path:
    """The adapter folder that ``path`` names: the folder itself, or ``RUN_DIR/adapter`` for a run folder.

    Args:
        path: What the user gave.
        flag: The option that gave it, named in errors (``""``: a positional argument).

    Raises:
        ModelError: if ``path`` is missing, a file, a run without an adapter yet, or not an adapter folder.
    """
    path = Path(path).expanduser()
    given = f"{flag} {path}".strip()
    if not path.exists():
        raise ModelError(f"{given}: no such folder; give a run folder (workspace/<job>/<run-id>) "
                         f"or its {FINAL_ADAPTER_DIR}/ folder")
    if not path.is_dir():
        raise ModelError(f"{given} is a file; give the adapter folder that holds {MODEL_INFO_FILE}")
    if (path / CONFIG_FILE).is_file() and not (path / MODEL_INFO_FILE).is_file():  # a run folder
        if not (path / FINAL_ADAPTER_DIR / MODEL_INFO_FILE).is_file():
            raise ModelError(f"{path} is a run folder without a final {FINAL_ADAPTER_DIR}/ (it is written after the "
                             f"last round); finish the run with: fedpeft run --resume {path}")
        path = path / FINAL_ADAPTER_DIR
    if not (path / MODEL_INFO_FILE).is_file():
        found = (f"a PEFT adapter that fedpeft did not write (no {MODEL_INFO_FILE} naming its base model)"
                 if (path / ADAPTER_CONFIG_FILE).is_file() else
                 f"neither an adapter folder (no {MODEL_INFO_FILE}) nor a run folder (no {CONFIG_FILE})")
        raise ModelError(f"{flag} {path}".strip() + f" is {found}; give a run folder (workspace/<job>/<run-id>), its "
                         f"{FINAL_ADAPTER_DIR}/ folder, or a folder written by fedpeft export --out")
    return path


def open_adapter(path: str | Path, flag: str = "--adapter") -> SavedAdapter:
    """Read a saved adapter's settings without loading any weights.

    Args:
        path: An adapter folder, or a run folder (its ``adapter/`` is used).
        flag: The option that gave ``path``, named in errors (``""``: a positional argument).

    Returns:
        The base model, method and prompt settings the adapter was trained with.

    Raises:
        ModelError: if ``path`` is not an adapter or run folder, or its files are unreadable.
    """
    folder = adapter_folder(path, flag)
    try:
        info = json.loads((folder / MODEL_INFO_FILE).read_text())
        model = ModelConfig(**info["model"])
        prompt_learning = PeftConfig.from_pretrained(str(folder)).is_prompt_learning
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{folder}: the adapter's {MODEL_INFO_FILE} or {ADAPTER_CONFIG_FILE} is unreadable "
                         f"({type(e).__name__}: {e}); export the adapter again from its run") from None
    job = _job_settings(folder, info)
    return SavedAdapter(
        path=folder, model=model, method=info.get("peft", {}).get("method", "?"), prompt_learning=prompt_learning,
        prompt_template=info.get("prompt_template"), system_prompt=job.get(KEY_SYSTEM_PROMPT),
        max_new_tokens=job.get("max_new_tokens"), repetition_penalty=job.get("repetition_penalty"),
    )


def _job_settings(folder: Path, info: dict) -> dict:
    """System prompt and generation settings: from ``info`` (an export), else the run's ``config.yaml``."""
    if KEY_SYSTEM_PROMPT in info:
        return {KEY_SYSTEM_PROMPT: info[KEY_SYSTEM_PROMPT], **(info.get(KEY_GENERATION) or {})}
    config = folder.parent / CONFIG_FILE
    if not config.is_file():
        return {}
    job = yaml.safe_load(config.read_text()) or {}
    data, evaluation = job.get("data") or {}, job.get("eval") or {}
    return {KEY_SYSTEM_PROMPT: data.get(KEY_SYSTEM_PROMPT), "max_new_tokens": evaluation.get("max_new_tokens"),
            "repetition_penalty": evaluation.get("repetition_penalty")}


def load_model(saved: SavedAdapter, device: str = "cpu", *,
               dequantize: bool = False) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """Load the base model with the adapter on top (inference mode) and its tokenizer.

    Args:
        saved: From :func:`open_adapter`.
        device: ``"cpu"`` or a CUDA device.
        dequantize: Load a 4-bit/8-bit base (``model.quantization``) unquantised, in ``model.dtype``.

    Returns:
        ``(model, tokenizer)``; the tokenizer's chat template is the job's ``data.prompt_template``
        when it set one.
    """
    from fedpeft.models import load_base_model

    cfg = saved.model.model_copy(update={"quantization": "none"}) if dequantize else saved.model
    base, tok = load_base_model(cfg, device)
    return attach_adapter(base, saved), with_job_template(tok, saved)


def attach_adapter(base: PreTrainedModel, saved: SavedAdapter) -> PeftModel:
    """``base`` with the adapter ``saved`` on top (inference mode); :func:`detach_adapter` undoes it."""
    with warnings.catch_warnings():  # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return PeftModel.from_pretrained(base, saved.path)


def detach_adapter(model: PeftModel) -> PreTrainedModel:
    """The base model of ``model`` as it was before :func:`attach_adapter`, so another adapter can go on it.

    Layer adapters (LoRA, IA3) are removed without merging; prompt learning never touched the base.
    """
    if model.peft_config[model.active_adapter].is_prompt_learning:
        return model.get_base_model()
    return model.unload()


def load_tokenizer(saved: SavedAdapter) -> PreTrainedTokenizerBase:
    """The base model's tokenizer with the job's chat template (no weights loaded)."""
    from fedpeft.models import load_tokenizer as load_base_tokenizer

    return with_job_template(load_base_tokenizer(saved.model), saved)


def with_job_template(tok: PreTrainedTokenizerBase, saved: SavedAdapter) -> PreTrainedTokenizerBase:
    """``tok`` with the chat template built from the job's ``data.prompt_template``, if it set one."""
    if saved.prompt_template:  # the layout the adapter was trained with
        from fedpeft.data.prompts import chat_template_from

        tok.chat_template = chat_template_from(saved.prompt_template)
    return tok
