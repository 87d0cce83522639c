"""Typed job configuration: YAML -> validated pydantic models, one error listing every problem.

A native job is one YAML file (see ``configs/``). ``load_config`` reads it, applies
``key=value`` overrides, and validates the whole file: unknown keys, bad values, unknown
registry names (aggregator, PEFT method, partitioner, metric) and their hyperparameters. The
resulting :class:`ConfigError` lists every problem with its YAML path, line, bad value and
what would be valid.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from fedpeft.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = "smollm2-135m-instruct"  # hub id, local folder, .gguf file, or a built-in name
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    devices: Literal["auto", "cpu"] | list[str] = "auto"  # auto: every CUDA device, else CPU
    trust_remote_code: bool = False  # needed for models like ChatGLM; runs the model's own code
    revision: str | None = None
    gguf_file: str | None = None  # file name inside a hub repo / folder holding GGUF weights


class PeftConfig(_Section):
    """``method`` names a registered PEFT method; the other keys are its hyperparameters."""

    model_config = ConfigDict(extra="allow")
    method: str = "lora"

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class AggregationConfig(_Section):
    """``name`` names a registered aggregator; the other keys are its hyperparameters."""

    model_config = ConfigDict(extra="allow")
    name: str = "fedavg"

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PartitionConfig(_Section):
    """``method`` names a registered partitioner; the other keys are its parameters."""

    model_config = ConfigDict(extra="allow")
    method: str = "iid"

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataConfig(_Section):
    train: str = "builtin:sample"  # JSONL path, 'hf:<dataset id>', or 'builtin:sample'
    test: str | None = None  # JSONL path; None: hold out test_ratio of train (by 'split_by')
    test_ratio: float = Field(0.1, gt=0, lt=1)
    split_by: str | None = None  # keep each value of this field on one side (e.g. 'focus')
    client_files: list[str] | None = None  # one JSONL per client: each site brings its own data
    question_field: str | None = None  # None: detect question/instruction/input/Question
    answer_field: str | None = None  # None: detect answer/response/output/Answer
    system_prompt: str | None = None
    max_seq_len: int = Field(384, ge=16)  # longer costs memory and time per step quadratically
    max_train_samples: int | None = Field(None, ge=1)
    max_test_samples: int | None = Field(None, ge=1)


class FederationConfig(_Section):
    num_clients: int = Field(4, ge=1)
    rounds: int = Field(3, ge=1)
    clients_per_round: int | float | None = None  # None: all; int: count; float in (0,1]: fraction
    min_clients: int = Field(1, ge=1)  # a round fails if fewer clients finish
    partition: PartitionConfig = PartitionConfig()
    aggregation: AggregationConfig = AggregationConfig()


class TrainConfig(_Section):
    learning_rate: float = Field(1e-3, gt=0)
    local_epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # cap on optimizer steps per client per round
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    bf16: bool = False  # bf16 autocast on devices that support it (CUDA with bf16, CPU)
    fedprox_mu: float = Field(0.0, ge=0)  # FedProx proximal term; 0 disables it


class EvalConfig(_Section):
    every: int = Field(1, ge=0)  # evaluate every N rounds; 0: only after the last round
    zero_shot: bool = True  # also evaluate the base model before round 1
    max_samples: int | None = Field(40, ge=1)  # test questions generated per evaluation
    batch_size: int = Field(8, ge=1)  # batched left-padded generation; ~5x faster than 1 on CPU
    max_new_tokens: int = Field(256, ge=1)  # dominant cost of evaluation
    repetition_penalty: float = Field(1.1, ge=1.0)  # >1 curbs the loops of greedy decoding
    metrics: list[str] = ["rouge1", "rouge2", "rougeL", "bleu4"]
    heldout_loss: bool = True
    merge_lora: bool = True  # merge LoRA into the weights while generating (faster), then restore


class JobConfig(_Section):
    job: str = "fedpeft"
    seed: int = 0
    workspace: str = "workspace"
    run_id: str | None = None  # None: a timestamp
    model: ModelConfig = ModelConfig()
    peft: PeftConfig = PeftConfig()
    data: DataConfig = DataConfig()
    federation: FederationConfig = FederationConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    def sampled_per_round(self) -> int:
        """Number of clients sampled each round."""
        k = self.federation.clients_per_round
        n = self.federation.num_clients
        if k is None:
            return n
        if isinstance(k, float) and k <= 1.0:
            return max(1, round(k * n))
        return min(int(k), n)


# --------------------------------------------------------------------------------------------
# Loading and validation


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (``lr=1e-3``, ``x=[1,2]``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.learning_rate=1e-4)")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return tree


def line_of(node: yaml.Node | None, loc: tuple) -> int | None:
    """1-based line of the YAML node at ``loc`` (deepest existing ancestor), if known."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if getattr(k, "value", None) == str(part)]
            match_key = [k for k, v in node.value if getattr(k, "value", None) == str(part)]
            if not match:
                break
            line = match_key[0].start_mark.line + 1
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = JobConfig
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = field.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _describe(loc: tuple, msg: str, value: Any, err_type: str) -> str:
    path = ".".join(str(p) for p in loc)
    if err_type == "extra_forbidden":
        parent = _model_at(loc)
        valid = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{path}: unknown key{hint} Valid keys here: {', '.join(valid)}"
    shown = repr(value) if not isinstance(value, dict) else "a mapping"
    return f"{path}: {msg} (got {shown})"


def _section(tree: dict, *path: str) -> dict:
    node: Any = tree
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def _named_problems(base: tuple, key: str, section: dict, default: str, registry: Any) -> list[tuple[tuple, str]]:
    """Check a ``{<key>: name, **params}`` section against its registry entry's signature."""
    from fedpeft.params import param_errors, valid_params

    name = section.get(key, default)
    params = {k: v for k, v in section.items() if k != key}
    try:
        cls = registry.get(str(name))
    except Exception as e:  # noqa: BLE001 - registry and plugin import errors alike
        return [(base + (key,), str(e))]
    problems = []
    for loc, msg, value in param_errors(cls, params):
        if msg.startswith("Extra inputs"):
            close = difflib.get_close_matches(str(loc[-1]), valid_params(cls), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            msg = f"not a parameter of {name!r}{hint} Valid: {', '.join(valid_params(cls)) or 'none'}"
        else:
            msg = f"{msg} (got {value!r})"
        problems.append((base + loc, msg))
    return problems


def _registry_problems(tree: dict) -> list[tuple[tuple, str]]:
    """Check registry names and their hyperparameters in the raw tree; ``(loc, message)`` pairs."""
    from fedpeft.aggregators import AGGREGATORS
    from fedpeft.data.partitioners import PARTITIONERS
    from fedpeft.metrics import METRICS
    from fedpeft.peft_methods import PEFT_METHODS

    problems = _named_problems(("peft",), "method", _section(tree, "peft"), "lora", PEFT_METHODS)
    problems += _named_problems(("federation", "aggregation"), "name",
                                _section(tree, "federation", "aggregation"), "fedavg", AGGREGATORS)
    problems += _named_problems(("federation", "partition"), "method",
                                _section(tree, "federation", "partition"), "iid", PARTITIONERS)
    metrics = _section(tree, "eval").get("metrics", [])
    for i, metric in enumerate(metrics if isinstance(metrics, list) else []):
        try:
            METRICS.get(str(metric))
        except Exception as e:  # noqa: BLE001
            problems.append((("eval", "metrics", i), str(e)))
    return problems


def _semantic_problems(cfg: JobConfig) -> list[tuple[tuple, str]]:
    fed = cfg.federation
    problems: list[tuple[tuple, str]] = []
    k = fed.clients_per_round
    if k is not None and (k <= 0 or (isinstance(k, int) and k > fed.num_clients)):
        problems.append((("federation", "clients_per_round"),
                         f"must be a count in 1..num_clients ({fed.num_clients}) or a fraction in (0, 1] (got {k!r})"))
    if fed.min_clients > cfg.sampled_per_round():
        problems.append((("federation", "min_clients"),
                         f"must be <= clients sampled per round ({cfg.sampled_per_round()}) (got {fed.min_clients})"))
    files = cfg.data.client_files
    if files is not None and len(files) != fed.num_clients:
        problems.append((("data", "client_files"),
                         f"lists {len(files)} files but federation.num_clients is {fed.num_clients}; "
                         "give one file per client"))
    return problems


def validate_tree(tree: Any, source: str = "<config>", root: yaml.Node | None = None) -> JobConfig:
    """Validate a parsed YAML tree; raise one :class:`ConfigError` listing every problem."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (model, peft, data, ...), "
                          f"got {type(tree).__name__}")
    problems: list[tuple[tuple, str]] = []
    try:
        cfg = JobConfig.model_validate(tree)
    except pydantic.ValidationError as e:
        for err in e.errors():
            loc = tuple(err["loc"])
            problems.append((loc, _describe(loc, err["msg"], err.get("input"), err["type"])))
        cfg = None
    problems += [(loc, f"{'.'.join(map(str, loc))}: {msg}") for loc, msg in _registry_problems(tree)]
    if cfg is not None:
        problems += [(loc, f"{'.'.join(map(str, loc))}: {msg}") for loc, msg in _semantic_problems(cfg)]
    if problems:
        lines = []
        for loc, text in problems:
            line = line_of(root, loc)
            lines.append(f"  - {source}{f':{line}' if line else ''}: {text}")
        noun = "problem" if len(problems) == 1 else "problems"
        raise ConfigError(f"{len(problems)} {noun} in {source}:\n" + "\n".join(lines))
    assert cfg is not None
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read, override and validate a native fedpeft YAML job.

    Args:
        path: The YAML file.
        overrides: ``key=value`` strings applied on top (dotted keys, YAML values).

    Returns:
        The validated configuration.

    Raises:
        ConfigError: listing every problem, each with file, line, key and what is valid.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text)
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    tree = apply_overrides(tree, overrides or [])
    return validate_tree(tree, source=str(path), root=root)


def dump_config(cfg: JobConfig) -> str:
    """The fully resolved config as YAML (written into every run directory)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
