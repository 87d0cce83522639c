"""Typed job configuration: YAML -> validated pydantic models, one error listing every problem.

A native job is one YAML file (see ``configs/``). ``load_config`` reads it, applies
``key=value`` overrides, resolves relative data paths (beside the YAML file first, then the
working directory) and validates the whole file: unknown keys, bad values, unknown registry
names (aggregator, PEFT method, partitioner, metric) and their hyperparameters. The resulting
:class:`ConfigError` lists every problem with its YAML path, line, bad value and what would be
valid (:mod:`fedpeft.problems`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedpeft.data.io import resolve_input
from fedpeft.data.mcq_io import load_mcq
from fedpeft.errors import ConfigError, DataError
from fedpeft.privacy.settings import AuditConfig, PrivacyConfig
from fedpeft.tracking.settings import TrackingConfig
from fedpeft.problems import Loc, Problems, read_yaml

log = logging.getLogger(__name__)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = "smollm2-135m-instruct"  # hub id, local folder, .gguf file, or a built-in name
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    devices: Literal["auto", "cpu"] | list[str] = "auto"  # auto: every CUDA device, else CPU
    trust_remote_code: bool = False  # needed for models like ChatGLM; runs the model's own code
    revision: str | None = None
    gguf_file: str | None = None  # file name inside a hub repo / folder holding GGUF weights
    # bitsandbytes quantisation of the frozen base (QLoRA); adapters stay fp32 and travel in fp32.
    # 4bit: ~0.5 byte per base weight (+ absmax), 8bit: ~1 byte; dtype is then the compute dtype.
    quantization: Literal["none", "8bit", "4bit"] = "none"
    quant_type: Literal["nf4", "fp4"] = "nf4"  # 4bit code book (QLoRA's NF4, or FP4)
    double_quant: bool = True  # 4bit: quantise the absmax constants too (~0.4 bit per weight saved)


class _Named(_Section):
    """A registry name plus the keyword parameters of what it names (every other key)."""

    model_config = ConfigDict(extra="allow")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PeftConfig(_Named):
    """``method`` names a registered PEFT method; the other keys are its hyperparameters."""

    method: str = "lora"


class AggregationConfig(_Named):
    """``name`` names a registered aggregator; the other keys are its hyperparameters."""

    name: str = "fedavg"


class PartitionConfig(_Named):
    """``method`` names a registered partitioner; the other keys are its parameters."""

    method: str = "iid"


class CodecConfig(_Named):
    """``name`` names a registered codec (none, fp16, bf16, int8, nf4, topk); the other keys are its
    parameters (``block_size``, ``fraction``)."""

    name: str = "none"


class CompressionConfig(_Section):
    """Update compression on the wire (README "Compression"); ``none`` both ways by default."""

    up: CodecConfig = CodecConfig()  # client -> server: the client's delta (top-k keeps its residual)
    down: CodecConfig = CodecConfig()  # server -> client: the global adapter


class DataConfig(_Section):
    train: str = "builtin:sample"  # JSONL path, 'hf:<dataset id>', or 'builtin:sample'
    test: str | None = None  # JSONL path; None: hold out test_ratio of train (by 'split_by')
    test_ratio: float = Field(0.1, gt=0, lt=1)
    split_by: str | None = None  # keep each value of this field on one side (e.g. 'focus')
    client_files: list[str] | None = None  # one JSONL per client: each site brings its own data
    question_field: str | None = None  # None: detect question/instruction/input/Question
    answer_field: str | None = None  # None: detect answer/response/output/Answer
    system_prompt: str | None = None
    # Prompt layout instead of the tokenizer's chat template (models without one, e.g. ChatGLM):
    # placeholders {bos} {eos} {question} {system}, e.g. "{bos}{question}\n"; None: the chat template
    prompt_template: str | None = None

    @field_validator("prompt_template")
    @classmethod
    def _known_placeholders(cls, template: str | None) -> str | None:
        if template is not None:
            from fedpeft.data.prompts import chat_template_from

            chat_template_from(template)  # ValueError names the unknown placeholder
            if "{question}" not in template:
                raise ValueError("has no {question}: the model would never see the question")
        return template
    max_seq_len: int = Field(384, ge=16)  # longer costs memory and time per step quadratically
    # At most this many training rows in total over all clients: a seeded subset of the training
    # rows, taken after the test rows are held out. Pooled data (data.train) is capped, then
    # partitioned; with client_files each client keeps max_train_samples // num_clients of its
    # own rows, so a deployed site can apply the cap alone.
    max_train_samples: int | None = Field(None, ge=1)
    max_test_samples: int | None = Field(None, ge=1)
    # Per-site scores: each client holds out this share of its own rows (by split_by, seeded) and
    # the global adapter is scored on every client's slice at each evaluation; 0: off. In a
    # deployment each site scores its slice itself and sends only the numbers.
    client_test_ratio: float = Field(0.0, ge=0, lt=1)


class FederationConfig(_Section):
    num_clients: int = Field(4, ge=1)
    rounds: int = Field(3, ge=1)
    clients_per_round: int | float | None = None  # None: all; int >= 1: count; float in (0, 1]: fraction
    min_clients: int = Field(1, ge=1)  # a round fails if fewer clients finish
    # An update whose L2 distance to the global adapter exceeds this is dropped for the round
    # (a faulty or hostile site); None: no bound. Non-finite updates are always dropped.
    max_update_norm: float | None = Field(None, gt=0)
    # The server adds each update to running sums as it arrives (it never holds them all).
    # sampled: in sampled order, so runs are bit-identical (a site answering early waits in
    # memory); arrival: strictly one update held, last-bit differences between runs.
    fold_order: Literal["sampled", "arrival"] = "sampled"
    compression: CompressionConfig = CompressionConfig()
    # LoRA rank of each client, in client (site) order, each <= peft.r (the global adapter's);
    # None: every client trains the whole adapter. See README "Heterogeneous ranks".
    client_ranks: list[Annotated[int, Field(ge=1)]] | None = None
    partition: PartitionConfig = PartitionConfig()
    aggregation: AggregationConfig = AggregationConfig()

    @field_validator("clients_per_round")
    @classmethod
    def _count_or_fraction(cls, k: int | float | None) -> int | float | None:
        if k is None or (isinstance(k, int) and k >= 1) or (isinstance(k, float) and 0 < k <= 1):
            return k
        what = "a float above 1: neither a count (an integer) nor a fraction" if isinstance(k, float) else "below 1"
        raise ValueError(f"{k!r} is {what}; give a count of clients (an integer >= 1, e.g. 2) or a fraction "
                         "in (0, 1] (e.g. 0.5 for half of the clients)")


class TrainConfig(_Section):
    learning_rate: float = Field(1e-3, gt=0)
    local_epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # cap on optimizer steps per client per round
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    bf16: bool = False  # bf16 autocast on devices that support it (CUDA with bf16, CPU)
    # Recompute each layer's activations in the backward pass: less activation memory, ~30 % more time
    gradient_checkpointing: bool = False
    fedprox_mu: float = Field(0.0, ge=0)  # FedProx proximal term; 0 disables it


class EvalConfig(_Section):
    every: int = Field(1, ge=0)  # evaluate every N rounds; 0: only after the last round
    zero_shot: bool = True  # also evaluate the base model before round 1
    max_samples: int | None = Field(40, ge=1)  # test questions generated per evaluation
    batch_size: int = Field(8, ge=1)  # batched left-padded generation; ~5x faster than 1 on CPU
    max_new_tokens: int = Field(256, ge=1)  # dominant cost of evaluation
    repetition_penalty: float = Field(1.1, ge=1.0)  # >1 curbs the loops of greedy decoding
    stop_at_blank_line: bool = False  # end an answer at its first blank line once it has max_new_tokens/2 tokens
    metrics: list[str] = ["rouge1", "rouge2", "rougeL", "bleu4"]
    heldout_loss: bool = True
    merge_lora: bool = True  # merge LoRA into the weights while generating (faster), then restore
    # JSONL of multiple-choice items (fedpeft data mcq; PubMedQA, MedMCQA, MedQA, CareQA exports):
    # adds mcq_accuracy; one forward pass over each item's options, batch_size options a pass
    mcq: str | None = None
    mcq_max_items: int | None = Field(None, ge=1)  # score only the first N items (cost grows with N)
    # score only each option's first N tokens (None: whole options): long free-text options cost a forward each
    mcq_option_tokens: int | None = Field(None, ge=1)
    # Per-site scores (data.client_test_ratio): questions generated per site (0: held-out loss only)
    site_max_samples: int = Field(0, ge=0)
    # Personalised scores too: each site first trains the global adapter this many local steps on its
    # own training rows (kept on the site, never sent), then scores its slice again; 0: off
    site_finetune_steps: int = Field(0, ge=0)

    @field_validator("mcq")
    @classmethod
    def _mcq_file(cls, path: str | None) -> str | None:
        if path is None:
            return path
        try:
            load_mcq(path)  # parsed once and cached: evaluation reuses it
        except DataError as e:
            raise ValueError(str(e)) from None
        return path


class CheckpointConfig(_Section):
    keep: int = Field(3, ge=1)  # the newest checkpoints kept in checkpoints/ (older ones are deleted)


class JobConfig(_Section):
    job: str = "fedpeft"  # the folder <workspace>/<job>
    seed: int = Field(0, ge=0)
    workspace: str = "workspace"
    run_id: str | None = None  # None: a timestamp
    model: ModelConfig = ModelConfig()
    peft: PeftConfig = PeftConfig()
    data: DataConfig = DataConfig()
    federation: FederationConfig = FederationConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    audit: AuditConfig = AuditConfig()
    tracking: TrackingConfig = TrackingConfig()  # [tensorboard, mlflow]: each round's numbers to local stores

    @field_validator("job", "run_id")
    @classmethod
    def _folder_name(cls, name: str | None) -> str | None:
        if name is None or re.fullmatch(r"\w[\w.-]*", name):
            return name
        raise ValueError(f"{name!r} is not a plain folder name: use letters, digits, '_', '-' and '.', "
                         "starting with a letter or digit (no '/' or '..')")

    def sampled_per_round(self) -> int:
        """Number of clients sampled each round."""
        k = self.federation.clients_per_round
        n = self.federation.num_clients
        if k is None:
            return n
        if isinstance(k, float):  # a fraction: validation rejects floats above 1
            return max(1, round(k * n))
        return min(k, n)


# --------------------------------------------------------------------------------------------
# Loading and validation


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """``tree[a][b][c] = value`` for ``a.b.c``: the one setter of overrides and benchmark grids.

    Missing or empty (``None``) sections are created; a mapping value replaces the whole section.

    Raises:
        ConfigError: if a part of the path holds a value, not a section.
    """
    node = tree
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            where = ".".join(parts[:i + 1])
            raise ConfigError(f"cannot set {dotted!r}: {where!r} is a value ({node[part]!r}), not a section")
        node = node[part]
    node[parts[-1]] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (``lr=1e-3``, ``x=[1,2]``).

    Raises:
        ConfigError: for an item that is not ``key=value`` or whose path crosses a value.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.learning_rate=1e-4)")
        set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return tree


def resolve_data_paths(tree: dict, base_dir: Path) -> dict:
    """Resolve relative ``data.train``, ``data.test``, ``data.client_files`` and ``eval.mcq`` of a raw tree.

    Each is looked up beside the YAML file (``base_dir``) first, then in the working directory
    (:func:`fedpeft.data.io.resolve_input`, which logs the choice); ``builtin:`` and ``hf:``
    values pass through. Non-string values are left for validation to report.
    """
    evaluation = tree.get("eval")
    if isinstance(evaluation, dict) and isinstance(evaluation.get("mcq"), str):
        evaluation["mcq"] = resolve_input(evaluation["mcq"], base_dir, "eval.mcq")
    data = tree.get("data")
    if not isinstance(data, dict):
        return tree
    for key in ("train", "test"):
        if isinstance(data.get(key), str):
            data[key] = resolve_input(data[key], base_dir, f"data.{key}")
    files = data.get("client_files")
    if isinstance(files, list):
        data["client_files"] = [resolve_input(f, base_dir, f"data.client_files.{i}") if isinstance(f, str) else f
                                for i, f in enumerate(files)]
    return tree


def check_tree(tree: Any, problems: Problems, source: str = "<config>", root: yaml.Node | None = None,
               prefix: Loc = (), partial: bool = False) -> JobConfig | None:
    """Validate a parsed YAML job tree, adding every problem found to ``problems``.

    Args:
        tree: The job tree (after overrides and path resolution).
        problems: Where to record problems.
        source: The file named in each problem.
        root: The file's composed YAML node, for line numbers.
        prefix: Where ``tree`` sits in that file (``("benchmarkingjob", "fedpeft", "config")``).
        partial: ``tree`` is only part of a job (Ianvs ``fedpeft.config``): skip the checks
            between keys (``min_clients`` against ``clients_per_round``...); whole jobs get them.

    Returns:
        The validated config, or None if this tree has any problem.
    """
    if not isinstance(tree, dict):
        problems.add(source, prefix, "expected a mapping of sections (model, peft, data, ...), "
                     f"got {type(tree).__name__}", root)
        return None
    before = len(problems)
    try:
        cfg: JobConfig | None = JobConfig.model_validate(tree)
    except pydantic.ValidationError as e:
        problems.add_validation_error(e, JobConfig, source, root, prefix)
        cfg = None
    from fedpeft.config_checks import registry_problems, semantic_problems

    found = registry_problems(tree) + (semantic_problems(cfg) if cfg is not None and not partial else [])
    for loc, msg in found:
        problems.add(source, tuple(prefix) + tuple(loc), msg, root)
    return cfg if len(problems) == before else None


def validate_tree(tree: Any, source: str = "<config>", root: yaml.Node | None = None) -> JobConfig:
    """Validate a parsed YAML tree; raise one :class:`ConfigError` listing every problem."""
    problems = Problems()
    cfg = check_tree(tree, problems, source, root)
    problems.raise_if_any(source)
    assert cfg is not None
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read, override and validate a native fedpeft YAML job.

    Relative ``data.train`` / ``data.test`` / ``data.client_files`` / ``eval.mcq`` are resolved beside the file
    first, then in the working directory, so the returned config (and the ``config.yaml`` a run
    writes from it) holds absolute paths.

    Args:
        path: The YAML file.
        overrides: ``key=value`` strings applied on top (dotted keys, YAML values).

    Returns:
        The validated configuration.

    Raises:
        ConfigError: listing every problem, each with file, line, key and what is valid.
    """
    path = Path(path)
    problems = Problems()
    tree, root = read_yaml(path, problems)
    if tree is None and not problems:
        problems.add(str(path), (), f"empty config: {path} has no keys; see configs/ for examples")
    problems.raise_if_any(str(path))
    if isinstance(tree, dict):  # anything else is reported by validate_tree
        apply_overrides(tree, overrides or [])
        resolve_data_paths(tree, path.parent)
    return validate_tree(tree, source=str(path), root=root)


def dump_config(cfg: JobConfig) -> str:
    """The fully resolved config as YAML (written into every run directory)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
