"""``fedpeft export``: a trained adapter made ready for a serving stack, alone or merged into its base.

* **Adapter folder** (:func:`export_adapter`): the PEFT adapter as the run saved it, plus the
  base model's tokenizer carrying the job's chat template (``data.prompt_template`` when set),
  and the job's system prompt and generation settings added to ``fedpeft_model.json``. It loads
  with ``peft.PeftModel.from_pretrained(base, OUT)``, serving stacks that take LoRA adapters
  (vLLM, TGI) take it, and ``fedpeft chat --adapter OUT`` runs it.
* **Merged model** (:func:`export_merged`): the base model with a LoRA-family or IA3 adapter
  merged into its weights (``merge_and_unload``), saved with its tokenizer and a
  ``generation_config.json`` holding the job's greedy settings (EOS ids, answer length), so
  ``AutoModelForCausalLM.from_pretrained(OUT)`` answers as the adapter does; the system prompt and
  repetition penalty to serve it with are in ``fedpeft_export.json``.
  Prompt-learning adapters (ptuning, prefix, prompt_tuning) have nothing to merge; a quantised
  base is merged only unquantised (``--dequantize``), since merging into 4-/8-bit weights
  rounds the adapter's update away.

Both write into a temporary folder beside ``OUT`` and rename it into place, and never replace
a non-empty ``OUT`` unless ``force`` is given.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from fedpeft.adapters import MODEL_INFO_FILE
from fedpeft.errors import ModelError
from fedpeft.io_utils import atomic_path
from fedpeft.serve.saved import SavedAdapter, load_model, load_tokenizer

log = logging.getLogger(__name__)

EXPORT_INFO_FILE = "fedpeft_export.json"  # in a merged folder: where it came from, the system prompt to serve with


def check_out(out: str | Path, source: Path, *, force: bool) -> Path:
    """``out`` as a folder that may be written: empty or missing, or replaceable with ``force``.

    Raises:
        ModelError: if ``out`` is a file, holds files (without ``force``), or contains or lies
            inside the adapter folder ``source`` (replacing it would delete the adapter).
    """
    out = Path(out).expanduser()
    here, there = out.resolve(), source.resolve()
    if here == there or here in there.parents or there in here.parents:
        raise ModelError(f"{out}: the output folder must lie outside the adapter folder {source} (and not contain it)")
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out} is a file; give a folder to write the export into")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ModelError(f"{out} already holds files; give an empty or new folder, or --force to replace it")
    return out


def export_adapter(saved: SavedAdapter, out: str | Path, *, force: bool = False) -> Path:
    """Write the adapter folder, the tokenizer and the job's settings to ``out``.

    Args:
        saved: The adapter (:func:`fedpeft.serve.saved.open_adapter`).
        out: The folder to write.
        force: Replace ``out`` if it holds files.

    Returns:
        The folder written.

    Raises:
        ModelError: if ``out`` may not be written (:func:`check_out`).
    """
    out = check_out(out, saved.path, force=force)
    tok = load_tokenizer(saved)
    with atomic_path(out) as tmp:
        shutil.copytree(saved.path, tmp)
        (tmp / MODEL_INFO_FILE).write_text(json.dumps(saved.info(), indent=2))
        tok.save_pretrained(tmp)
    log.info("exported the %s adapter %s to %s", saved.method, saved.path, out)
    return out


def check_mergeable(saved: SavedAdapter, *, dequantize: bool) -> None:
    """Refuse adapters that cannot be merged faithfully.

    Raises:
        ModelError: for a prompt-learning adapter, or a quantised base without ``dequantize``.
    """
    if saved.prompt_learning:
        raise ModelError(
            f"{saved.path}: a {saved.method} adapter cannot be merged into the model's weights: prompt-learning "
            "methods (ptuning, prefix, prompt_tuning) add virtual tokens, not weight updates. Export the adapter "
            f"folder instead: fedpeft export --adapter {saved.path} --out OUT (it loads with "
            "peft.PeftModel.from_pretrained(base, OUT))")
    quant = saved.model.quantization
    if quant != "none" and not dequantize:
        raise ModelError(
            f"{saved.path}: the base model is quantised (model.quantization: {quant}); merging into {quant} "
            "weights rounds most of the adapter's update away. Pass --dequantize to merge into the unquantised "
            f"base (model.dtype: {saved.model.dtype}; answers may differ slightly from the quantised model the "
            "adapter was trained on), or export the adapter folder with --out OUT")


def export_merged(saved: SavedAdapter, out: str | Path, *, force: bool = False, dequantize: bool = False,
                  device: str = "cpu") -> Path:
    """Merge the adapter into its base model and write a full model folder to ``out``.

    Args:
        saved: The adapter (:func:`fedpeft.serve.saved.open_adapter`).
        out: The folder to write.
        force: Replace ``out`` if it holds files.
        dequantize: Merge a quantised job's adapter into the unquantised base.
        device: Where to load and merge the model.

    Returns:
        The folder written.

    Raises:
        ModelError: if the adapter cannot be merged (:func:`check_mergeable`) or ``out`` may not
            be written (:func:`check_out`).
    """
    check_mergeable(saved, dequantize=dequantize)
    out = check_out(out, saved.path, force=force)
    model, tok = load_model(saved, device, dequantize=dequantize)
    merged = model.merge_and_unload()
    merged.generation_config = greedy_generation_config(merged, tok, saved)
    provenance = {"adapter": str(saved.path.resolve()), "method": saved.method,
                  "model": saved.model.model_dump(mode="json"), "dequantized": dequantize,
                  "prompt_template": saved.prompt_template, **saved.serving_settings()}
    with atomic_path(out) as tmp:
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / EXPORT_INFO_FILE).write_text(json.dumps(provenance, indent=2))
    log.info("merged the %s adapter %s into %s and saved it to %s", saved.method, saved.path, saved.model.name, out)
    return out


def greedy_generation_config(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                             saved: SavedAdapter) -> GenerationConfig:
    """Greedy decoding as the job evaluated: stop at the tokenizer's EOS (what training appended) or the model's.

    The job's repetition penalty is not among them: ``generate`` would apply it on top of the
    penalty that fedpeft's own generation passes, should the merged folder serve as a base model
    again. It is in ``fedpeft_export.json``; serve with it.
    """
    from fedpeft.generation import _eos_ids

    length = {} if saved.max_new_tokens is None else {"max_new_tokens": saved.max_new_tokens}
    return GenerationConfig(do_sample=False, num_beams=1, bos_token_id=model.generation_config.bos_token_id,
                            eos_token_id=_eos_ids(model, tok), pad_token_id=tok.pad_token_id, **length)
