"""Validate keyword parameters against a class's ``__init__`` signature (for registries).

Registered aggregators and PEFT methods declare their hyperparameters as typed keyword
arguments; config validation checks a YAML mapping against that signature, so a plugin needs no
extra schema.
"""

from __future__ import annotations

import inspect
import re
import typing
from typing import Any

import pydantic


def params_model(cls: type) -> type[pydantic.BaseModel]:
    """A pydantic model mirroring ``cls.__init__``'s keyword parameters (extra keys forbidden)."""
    fields: dict[str, Any] = {}
    try:  # resolve string annotations (modules using ``from __future__ import annotations``)
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - unresolvable hints: fall back to no type checking
        hints = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        annotation = hints.get(name, Any)
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[name] = (annotation, default)
    config = pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    return pydantic.create_model(f"{cls.__name__}Params", __config__=config, **fields)


def param_errors(cls: type, params: dict[str, Any]) -> list[tuple[tuple, str, Any]]:
    """Problems with ``params`` for ``cls``: ``(loc, message, bad_value)`` triples; empty if OK."""
    try:
        params_model(cls).model_validate(params)
    except pydantic.ValidationError as e:
        return [(tuple(err["loc"]), err["msg"], err.get("input")) for err in e.errors()]
    return []


def valid_params(cls: type) -> list[str]:
    """Names of ``cls``'s keyword parameters (for 'valid keys are ...' hints)."""
    return list(params_model(cls).model_fields)


def instantiate(registry: Any, name: str, params: dict[str, Any] | None, kind: str) -> Any:
    """Look ``name`` up in ``registry`` and construct it with validated, type-coerced ``params``.

    Args:
        registry: A :class:`fedpeft.registry.Registry` of classes.
        name: A registered name, ``path/file.py:Class`` plugin or entry point.
        params: Keyword arguments of the class's ``__init__`` (from YAML).
        kind: What it is, for messages (``"aggregator"``).

    Raises:
        RegistryError: if ``name`` is unknown (the message lists the valid names).
        ConfigError: if ``params`` has unknown keys, wrong types or out-of-range values.
    """
    from fedpeft.errors import ConfigError

    cls = registry.get(name)
    params = params or {}
    errors = param_errors(cls, params)
    if errors:
        valid = ", ".join(valid_params(cls)) or "none"
        problems = "; ".join(f"{'.'.join(map(str, loc)) or '(params)'}: {msg} (got {value!r})"
                             for loc, msg, value in errors)
        raise ConfigError(f"invalid parameters for {kind} {name!r}: {problems}. Valid: {valid}")
    validated = params_model(cls).model_validate(params)
    return cls(**{k: getattr(validated, k) for k in params})


def init_problem(cls: type, params: dict[str, Any], name: str) -> tuple[tuple[str, ...], str] | None:
    """Run ``cls(**params)`` as a job would; ``(key path, message)`` if its ``__init__`` refuses.

    ``params`` must already pass :func:`param_errors`. Range checks live in the constructors
    (``beta`` in [0, 1), ``r >= 1``...), so validation calls them rather than repeating them.

    Args:
        cls: A registered class (aggregator, PEFT method, partitioner).
        params: Its keyword parameters from YAML.
        name: The name the config used, for messages.

    Returns:
        ``((param,), message)`` for a :class:`ConfigError` naming a given parameter, ``((), message)``
        for any other failure (a plugin's own bug: the exception and the line it was raised on).
    """
    from fedpeft.errors import ConfigError
    from fedpeft.registry import describe_failure

    try:
        validated = params_model(cls).model_validate(params)
        cls(**{k: getattr(validated, k) for k in params})
    except ConfigError as e:
        msg = str(e)
        found = {p: m.start() for p in params if (m := re.search(rf"(?<![\w]){re.escape(p)}(?![\w])", msg))}
        return (tuple(sorted(found, key=found.get)[:1]), msg)  # the parameter the message names first
    except Exception as e:  # noqa: BLE001 - a plugin's __init__ may raise anything
        return ((), describe_failure(name, "__init__", e))
    return None
