"""One way to report configuration problems: collect them all, then raise one error.

Every config reader (native jobs in :mod:`fedpeft.config`, both benchmark formats in
:mod:`fedpeft.benchmark`, ``deploy.yaml`` in :mod:`fedpeft.deploy.settings`) adds what it finds
to a :class:`Problems` and calls :meth:`Problems.raise_if_any` once, so one
:class:`~fedpeft.errors.ConfigError` lists every problem, each with its file, line, key path,
the bad value and what would be valid. :func:`did_you_mean` is the one "closest valid name" hint.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
import yaml
from pydantic import BaseModel

from fedpeft.errors import ConfigError

Loc = Sequence[str | int]  # a key path into a YAML tree: ("federation", "aggregation", "beta")


def closest(name: str, valid: Iterable[str]) -> str | None:
    """The valid name closest to ``name`` (a likely misspelling), or None if none is close."""
    match = difflib.get_close_matches(str(name), list(valid), n=1)
    return match[0] if match else None


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the valid name closest to ``name``, or ``""``."""
    match = closest(name, valid)
    return f"; did you mean {match!r}?" if match else ""


def unknown_key(key: str | int, valid: Sequence[str], also_known: Iterable[str] = ()) -> str:
    """The message for a key that is not allowed where it is (with the closest valid key).

    Args:
        key: The key found.
        valid: The keys allowed there.
        also_known: Keys accepted there but unused; they may be the closest match too.
    """
    hint = did_you_mean(str(key), [*valid, *also_known])
    return f"unknown key {str(key)!r}{hint} Valid keys here: {', '.join(valid) or 'none'}"


def dotted(loc: Loc) -> str:
    """``("eval", "metrics", 1)`` -> ``"eval.metrics.1"``."""
    return ".".join(str(part) for part in loc)


def line_of(node: yaml.Node | None, loc: Loc) -> int | None:
    """1-based line of the key at ``loc`` below ``node`` (its deepest existing ancestor), if known."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if getattr(k, "value", None) == str(part)), None)
            if pair is None:
                break
            line, node = pair[0].start_mark.line + 1, pair[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


@dataclass(frozen=True)
class Problem:
    """One problem: where (file, line, key path) and what (bad value, what would be valid)."""

    source: str
    key: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class Problems:
    """Every problem found while reading one or more YAML files.

    Attributes:
        items: The problems, in the order found.
        ignored: Keys accepted but unused (``"file: key (why)"``), reported once as info.
    """

    def __init__(self) -> None:
        self.items: list[Problem] = []
        self.ignored: list[str] = []

    def __len__(self) -> int:
        return len(self.items)

    def add(self, source: str, loc: Loc, message: str, root: yaml.Node | None = None) -> None:
        """Record ``message`` about the key at ``loc`` of ``source``.

        Args:
            source: The file (or a label such as ``"<config>"``).
            loc: The key path; empty for the whole file.
            message: What is wrong: the bad value and what would be valid.
            root: The file's composed YAML node, for the line number.
        """
        self.items.append(Problem(source, dotted(loc), message, line_of(root, loc)))

    def add_validation_error(self, error: pydantic.ValidationError, model: type[BaseModel], source: str,
                             root: yaml.Node | None = None, prefix: Loc = ()) -> None:
        """Record every error of ``model.model_validate(tree)``; ``prefix``: where ``tree`` sits."""
        for err in error.errors():
            loc = tuple(prefix) + tuple(err["loc"])
            if err["type"] == "extra_forbidden":
                message = unknown_key(err["loc"][-1], valid_keys(model, err["loc"][:-1]))
            elif err["type"] == "missing":
                message = err["msg"]
            else:
                value = err.get("input")
                text = err["msg"].removeprefix("Value error, ")  # a validator's own message
                message = f"{text} (got {'a mapping' if isinstance(value, dict) else repr(value)})"
            self.add(source, loc, message, root)

    def raise_if_any(self, what: str) -> None:
        """Raise one :class:`ConfigError` listing every problem, if there is any.

        Args:
            what: What was read (the file name, or ``"benchmark"``), for the first line.

        Raises:
            ConfigError: ``"N problems in WHAT:"`` then one line per problem; its ``problems``
                attribute holds the :class:`Problem` objects.
        """
        if self.items:
            raise _one_error(self.items, what)


def _one_error(items: Sequence[Problem], what: str) -> ConfigError:
    """The one :class:`ConfigError` listing ``items`` (``error.problems`` holds them)."""
    first_seen = {source: i for i, source in reversed(list(enumerate(p.source for p in items)))}
    items = sorted(items, key=lambda p: (first_seen[p.source], p.line or 0))  # file by file, top to bottom
    noun = "problem" if len(items) == 1 else "problems"
    return ConfigError(f"{len(items)} {noun} in {what}:\n" + "\n".join(f"  - {p}" for p in items), items)


def read_yaml(path: Path, problems: Problems) -> tuple[Any, yaml.Node | None]:
    """``(tree, root node)`` of a YAML file; a missing or broken file is recorded as a problem."""
    if not path.is_file():
        problems.add(str(path), (), "file not found")
        return None, None
    text = path.read_text(encoding="utf-8")
    try:
        tree, root = yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as e:
        problems.add(str(path), (), f"not valid YAML: {e}")
        return None, None
    for loc, key, lines in _duplicate_keys(root, ()):
        problems.add(str(path), (*loc, key), f"the key {key!r} is given twice, on lines {lines[0]} and {lines[1]}; "
                     "YAML would silently keep only the last value: remove one", root)
    return tree, root


def _duplicate_keys(node: yaml.Node | None, loc: Loc) -> Iterator[tuple[Loc, str, tuple[int, int]]]:
    """``(where, key, (first line, repeated line))`` of every key given twice in one mapping."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value in node.value:
            key, line = str(key_node.value), key_node.start_mark.line + 1
            if key in seen:
                yield loc, key, (seen[key], line)
            seen.setdefault(key, line)
            yield from _duplicate_keys(value, (*loc, key))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _duplicate_keys(item, (*loc, i))


def submodels(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (``X``, ``list[X]``, ``X | None``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (list, typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in submodels(arg)]
    return []


def valid_keys(model: type[BaseModel], loc: Loc) -> list[str]:
    """The keys allowed at ``loc`` below ``model`` (list indices are skipped)."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        subs = submodels(field.annotation) if field is not None else []
        if not subs:
            return []
        model = subs[0]
    return [f.alias or name for name, f in model.model_fields.items()]
