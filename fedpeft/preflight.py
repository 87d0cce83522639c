"""What ``fedpeft validate`` checks beyond the config file itself, still without training.

:func:`fedpeft.config.load_config` checks the file (every ``fedpeft run`` does that). This module
goes further for ``fedpeft validate`` only, since it reads data files and model configs: every
data file loads and parses (each error with its ``file:line``), the split and the partition
work, the model name resolves (a built-in, a local folder, a ``.gguf`` file or a hub id in
reach), and LoRA's ``target_modules`` name modules of that model, whose module tree is built on
the ``meta`` device from its config (no weights are loaded). ``hf:`` data sets are not
downloaded: they are skipped, with a note.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from fedpeft.config import JobConfig
from fedpeft.errors import DataError
from fedpeft.problems import Loc, Problems, did_you_mean, read_yaml

_MODEL_HELP = "use a Hugging Face hub id, a local model folder, a .gguf file, or a built-in name"


def preflight(path: str | Path, cfg: JobConfig) -> list[str]:
    """Check the data files and the model of a validated job; raise one error listing every problem.

    Args:
        path: The job's YAML file (for line numbers).
        cfg: The job, as :func:`fedpeft.config.load_config` returned it.

    Returns:
        Notes on what was not checked (``hf:`` data sets, GGUF module trees...).

    Raises:
        ConfigError: listing every problem found, each with file, line and key.
    """
    problems = Problems()
    _, root = read_yaml(Path(path), Problems())
    notes: list[str] = []
    found = _data_problems(cfg, notes) + _model_problems(cfg, notes)
    for loc, msg in found:
        problems.add(str(path), loc, msg, root)
    problems.raise_if_any(str(path))
    return notes


def preflight_cases(path: str | Path, cases: list[tuple[str, JobConfig]]) -> list[str]:
    """:func:`preflight` for every test case of a benchmark; one error listing each problem once.

    Args:
        path: The benchmark file (named in the messages).
        cases: ``(test case name, its job config)`` pairs.

    Raises:
        ConfigError: a problem shared by several test cases (the same data file...) is listed
            once, with the cases it concerns.
    """
    found: dict[tuple, list[str]] = {}
    notes: list[str] = []
    for name, cfg in cases:
        for loc, msg in _data_problems(cfg, notes) + _model_problems(cfg, notes):
            found.setdefault((loc, msg), []).append(name)
    problems = Problems()
    for (loc, msg), names in found.items():
        shown = "; ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        problems.add(str(path), loc, f"{msg} (test case {shown})")
    problems.raise_if_any(str(path))
    return sorted(set(notes))


def _data_problems(cfg: JobConfig, notes: list[str]) -> list[tuple[Loc, str]]:
    """Load every data file as ``fedpeft run`` would; then split and partition the rows."""
    from fedpeft.data.federated import prepare_data
    from fedpeft.data.io import HF_PREFIX, load_examples, resolve_source

    d = cfg.data
    fields = {"question_field": d.question_field, "answer_field": d.answer_field}
    sources: list[tuple[Loc, str]] = [(("data", "client_files", i), f) for i, f in enumerate(d.client_files or [])]
    if not d.client_files:
        sources.append((("data", "train"), d.train))
    if d.test:
        sources.append((("data", "test"), d.test))
    problems: list[tuple[Loc, str]] = []
    for loc, spec in sources:
        if spec.startswith(HF_PREFIX):
            notes.append(f"{'.'.join(map(str, loc))}: {spec} not checked (validate does not download data sets)")
            continue
        try:
            resolve_source(spec, **fields) if loc[1] == "train" else load_examples(spec, **fields)
        except DataError as e:
            problems.append((loc, str(e)))
    if problems or any(spec.startswith(HF_PREFIX) for _, spec in sources):
        return problems
    try:
        prepare_data(cfg)  # test_ratio split, split_by, caps and the partition, as a run does them
    except DataError as e:
        return [(("data", "split_by") if d.split_by and repr(d.split_by) in str(e) else ("data",), str(e))]
    return []


def _model_problems(cfg: JobConfig, notes: list[str]) -> list[tuple[Loc, str]]:
    """The model name resolves; LoRA's explicit ``target_modules`` each match one of its modules."""
    try:
        names = module_names(cfg)
    except LookupError as e:
        return [(("model", "name"), str(e))]
    if names is None:
        notes.append(f"peft.target_modules not checked against {cfg.model.name!r} (no config to build it from)")
        return []
    targets = cfg.peft.params.get("target_modules") if cfg.peft.method in ("lora", "ffa_lora") else None
    if targets is None or targets in ("all-linear", "default"):
        return []
    return _target_problems(targets, names, cfg.model.name)


def module_names(cfg: JobConfig) -> list[str] | None:
    """Dotted names of the model's modules, built on the meta device; None if it cannot be built.

    Raises:
        LookupError: if the name is neither a built-in, a local folder, a ``.gguf`` file nor a
            model whose config can be read from the hub (or, offline, its cache).
    """
    from transformers import AutoModelForCausalLM

    from fedpeft.models import BUILTIN_MODELS, tiny_config

    m = cfg.model
    if m.name in BUILTIN_MODELS:  # SmolLM2 is a Llama too: the same module names, more layers
        config = tiny_config(vocab_size=64)
    elif m.name.endswith(".gguf") or m.gguf_file:
        if m.name.endswith(".gguf") and not Path(m.name).expanduser().is_file():
            raise LookupError(f"GGUF file not found: {Path(m.name).expanduser()}; {_MODEL_HELP}")
        return None
    else:
        config = _hub_or_folder_config(m.name, m.revision, m.trust_remote_code)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=m.trust_remote_code)
    except Exception:  # noqa: BLE001 - an architecture that needs remote code or more than a config
        return None
    return [name for name, _ in model.named_modules() if name]


def _hub_or_folder_config(name: str, revision: str | None, trust_remote_code: bool):  # -> PretrainedConfig
    from transformers import AutoConfig

    from fedpeft.models import BUILTIN_MODELS

    local = Path(name).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        raise LookupError(f"{local} is a folder without config.json, not a model folder; {_MODEL_HELP}")
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        try:  # the hub cache first: offline, the hub's client would retry for ~30 s
            return AutoConfig.from_pretrained(name, local_files_only=True, **kwargs)
        except OSError:
            if not _hub_reachable():
                raise OSError("not in the Hugging Face cache and the hub is not reachable from here") from None
            return AutoConfig.from_pretrained(name, **kwargs)
    except Exception as e:  # noqa: BLE001 - OSError, HFValidationError, connection errors alike
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        hint = did_you_mean(name, BUILTIN_MODELS)
        raise LookupError(
            f"{name!r} is neither a local folder, a file, a built-in name ({', '.join(BUILTIN_MODELS)}) nor a "
            f"model reachable on the Hugging Face Hub (offline: not in the hub cache){hint} "
            f"[{type(e).__name__}: {first}]; {_MODEL_HELP}") from None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host accepts a connection (False at once when HF_HUB_OFFLINE is set)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _target_problems(targets: str | list[str], names: list[str], model: str) -> list[tuple[Loc, str]]:
    """PEFT's matching: a list entry matches a module named it or ending in ``.entry``; a string is a regex."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
    valid = f"module names of {model!r} include: {', '.join(leaves[:20])}"
    if isinstance(targets, str):
        if any(re.fullmatch(targets, n) for n in names):
            return []
        return [(("peft", "target_modules"), f"regex {targets!r} matches no module; {valid}")]
    return [(("peft", "target_modules", i), f"{t!r} matches no module{did_you_mean(t, leaves) or ';'} {valid}")
            for i, t in enumerate(targets) if not any(n == t or n.endswith("." + t) for n in names)]
