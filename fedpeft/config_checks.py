"""The checks of a job config that one field alone cannot make: registry names and their
hyperparameters (checked against each class's ``__init__``), and rules between keys.

:func:`fedpeft.config.check_tree` runs them after pydantic's field checks; every problem is a
``(YAML path, message)`` pair, so one error lists them all with their lines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedpeft.errors import RegistryError
from fedpeft.privacy.settings import privacy_problems
from fedpeft.problems import Loc, did_you_mean

if TYPE_CHECKING:
    from fedpeft.config import JobConfig

EXAMPLE_DP_METHODS = ("lora", "ffa_lora", "ptuning")  # Opacus computes per-example gradients for these


def _section(tree: dict, *path: str) -> dict:
    node: Any = tree
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def _named_problems(base: tuple, key: str, section: dict, default: str, registry: Any) -> list[tuple[Loc, str]]:
    """Check a ``{<key>: name, **params}`` section against its registry entry's signature."""
    from fedpeft.params import init_problem, param_errors, valid_params
    from fedpeft.registry import describe_failure

    name = section.get(key, default)
    params = {k: v for k, v in section.items() if k != key}
    try:
        cls = registry.get(str(name))
    except RegistryError as e:
        return [(base + (key,), str(e))]
    except Exception as e:  # noqa: BLE001 - a plugin file whose import raises
        return [(base + (key,), describe_failure(str(name), "import", e))]
    problems: list[tuple[Loc, str]] = []
    for loc, msg, value in param_errors(cls, params):
        if msg.startswith("Extra inputs"):
            valid = valid_params(cls)
            msg = f"not a parameter of {name!r}{did_you_mean(str(loc[-1]), valid)} Valid: {', '.join(valid) or 'none'}"
        else:
            msg = f"{msg} (got {value!r})"
        problems.append((base + loc, msg))
    failed = None if problems else init_problem(cls, params, str(name))  # range checks of __init__
    if failed is not None:
        problems.append((base + (failed[0] or (key,)), failed[1]))
    return problems


def registry_problems(tree: dict) -> list[tuple[Loc, str]]:
    """Check registry names and their hyperparameters in the raw tree; ``(loc, message)`` pairs."""
    from fedpeft.aggregators import AGGREGATORS
    from fedpeft.compression import CODECS
    from fedpeft.data.partitioners import PARTITIONERS
    from fedpeft.metrics import METRICS
    from fedpeft.peft_methods import PEFT_METHODS
    from fedpeft.registry import describe_failure

    problems = _named_problems(("peft",), "method", _section(tree, "peft"), "lora", PEFT_METHODS)
    problems += _named_problems(("federation", "aggregation"), "name",
                                _section(tree, "federation", "aggregation"), "fedavg", AGGREGATORS)
    problems += _named_problems(("federation", "partition"), "method",
                                _section(tree, "federation", "partition"), "iid", PARTITIONERS)
    for way in ("up", "down"):
        problems += _named_problems(("federation", "compression", way), "name",
                                    _section(tree, "federation", "compression", way), "none", CODECS)
    metrics = _section(tree, "eval").get("metrics", [])
    for i, metric in enumerate(metrics if isinstance(metrics, list) else []):
        try:
            METRICS.get(str(metric))
        except RegistryError as e:  # unknown name, missing file, wrong signature
            problems.append((("eval", "metrics", i), str(e)))
        except Exception as e:  # noqa: BLE001 - a plugin file whose import raises: its own error and line
            problems.append((("eval", "metrics", i), describe_failure(str(metric), "import", e)))
    return problems


def semantic_problems(cfg: JobConfig) -> list[tuple[Loc, str]]:
    fed, data = cfg.federation, cfg.data
    problems: list[tuple[Loc, str]] = []
    k = fed.clients_per_round
    if isinstance(k, int) and k > fed.num_clients:
        problems.append((("federation", "clients_per_round"),
                         f"must be a count in 1..num_clients ({fed.num_clients}) or a fraction in (0, 1] (got {k!r})"))
    if fed.min_clients > cfg.sampled_per_round():
        problems.append((("federation", "min_clients"),
                         f"must be <= clients sampled per round ({cfg.sampled_per_round()}) (got {fed.min_clients})"))
    files = data.client_files
    if files is not None and len(files) != fed.num_clients:
        problems.append((("data", "client_files"),
                         f"lists {len(files)} files but federation.num_clients is {fed.num_clients}; "
                         "give one file per client"))
    if data.max_train_samples is not None and data.max_train_samples < fed.num_clients:
        problems.append((("data", "max_train_samples"),
                         f"caps training rows in total over all clients, so it must be >= federation.num_clients "
                         f"({fed.num_clients}) for each client to keep a row (got {data.max_train_samples})"))
    if cfg.audit.canaries and cfg.audit.client >= fed.num_clients:
        problems.append((("audit", "client"), f"must be a client index in 0..{fed.num_clients - 1} (got {cfg.audit.client})"))
    if data.client_test_ratio and not (cfg.eval.heldout_loss or cfg.eval.site_max_samples):
        problems.append((("data", "client_test_ratio"), "asks for per-site scores, but eval.heldout_loss is false and "
                         "eval.site_max_samples is 0: nothing would be scored; turn one of them on"))
    if cfg.eval.site_finetune_steps and not data.client_test_ratio:
        problems.append((("eval", "site_finetune_steps"), "personalised scores are scored on each client's own slice: "
                         "set data.client_test_ratio (e.g. 0.2) too, or set this to 0"))
    from fedpeft.compression import CODECS

    problems += _rank_problems(cfg)
    down = cfg.federation.compression.down.name
    if down in CODECS.names() and getattr(CODECS.get(down), "needs_error_feedback", False):
        problems.append((("federation", "compression", "down", "name"), f"{down!r} only compresses updates "
                         "(up): a client sampled now and then has no residual of the global adapter to feed back; "
                         "use fp16, bf16, int8 or nf4 down"))
    dora = cfg.peft.params.get("use_dora", False)
    if cfg.privacy.level == "example" and (cfg.peft.method not in EXAMPLE_DP_METHODS or dora):
        what = "lora with use_dora" if dora else cfg.peft.method
        problems.append((("privacy", "level"), f"example-level DP supports peft.method {', '.join(EXAMPLE_DP_METHODS)} "
                         f"(without use_dora), not {what} (Opacus has no per-example gradients for its layers); "
                         "use privacy.level: client, or one of those methods"))
    return problems + privacy_problems(cfg.privacy)


def _rank_problems(cfg: JobConfig) -> list[tuple[Loc, str]]:
    ranks, loc = cfg.federation.client_ranks, ("federation", "client_ranks")
    if ranks is None:
        return []
    if len(ranks) != cfg.federation.num_clients:
        return [(loc, f"lists {len(ranks)} ranks but federation.num_clients is {cfg.federation.num_clients}; "
                 "give one rank per client")]
    if cfg.peft.method not in ("lora", "ffa_lora"):
        return [(loc, f"heterogeneous ranks need peft.method lora or ffa_lora, not {cfg.peft.method!r}")]
    top = int(cfg.peft.params.get("r", 16))
    if max(ranks) > top:
        return [(loc, f"every rank must be <= peft.r ({top}), the global adapter's rank (got {max(ranks)}); "
                 f"set peft.r: {max(ranks)}")]
    if cfg.privacy.level == "example":
        return [(loc, "example-level DP noises every gradient, so the components beyond a client's rank would "
                 "not stay zero; use privacy.level: client with heterogeneous ranks")]
    return []
