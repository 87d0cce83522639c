"""Typed YAML checking shared by both benchmark formats, and the ``rank`` section they share.

Every file model derives from :class:`FileModel`: unknown keys are errors naming the file, the
line, the key and the closest valid key; keys listed in a model's ``IGNORED`` (things Ianvs
uses and fedpeft does not need) are accepted and reported once. :class:`Problems` gathers every
problem of every file so that one :class:`~fedpeft.errors.ConfigError` lists them all.
"""

from __future__ import annotations

import difflib
import logging
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedpeft.config import line_of  # the YAML line lookup native configs use
from fedpeft.errors import ConfigError

log = logging.getLogger(__name__)


class FileModel(BaseModel):
    """A mapping of a benchmark file. ``IGNORED``: accepted keys fedpeft does not use -> why."""

    model_config = ConfigDict(extra="forbid")
    IGNORED: ClassVar[dict[str, str]] = {}


class Problems:
    """Every problem found in a set of YAML files, each with file, line and key path."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.ignored: list[str] = []

    def add(self, source: str, root: yaml.Node | None, loc: tuple, message: str) -> None:
        line = line_of(root, loc) if root is not None else None
        path = ".".join(str(p) for p in loc)
        where = f"{source}:{line}" if line else source
        self.items.append(f"{where}: {path + ': ' if path else ''}{message}")

    def absorb(self, error: ConfigError, source: str, path_prefix: str = "") -> None:
        """Take over the problems listed by a native config's :class:`ConfigError`.

        Args:
            error: Raised by :func:`fedpeft.config.validate_tree` with ``source``.
            source: The source name it was raised with.
            path_prefix: Prepended to each key path (the section the tree came from).
        """
        lines = [ln.strip()[2:] for ln in str(error).splitlines()[1:] if ln.strip().startswith("- ")]
        for line in lines or [str(error)]:
            if line.startswith(source):
                where, _, rest = line[len(source):].partition(": ")
                line = f"{source}{where}: {path_prefix}{rest}"
            self.items.append(line)

    def raise_if_any(self, what: str = "benchmark") -> None:
        if self.items:
            noun = "problem" if len(self.items) == 1 else "problems"
            raise ConfigError(f"{len(self.items)} {noun} in {what}:\n" + "\n".join(f"  - {p}" for p in self.items))


def read_yaml(path: Path, problems: Problems) -> tuple[Any, yaml.Node | None]:
    """``(tree, root node)`` of a YAML file; a missing or broken file is recorded as a problem."""
    if not path.is_file():
        problems.add(str(path), None, (), "file not found")
        return None, None
    text = path.read_text(encoding="utf-8")
    try:
        return yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as e:
        problems.add(str(path), None, (), f"not valid YAML: {e}")
        return None, None


def _submodels(annotation: Any) -> list[type[FileModel]]:
    """The :class:`FileModel` classes an annotation can hold (``X``, ``list[X]``, ``X | None``)."""
    if isinstance(annotation, type) and issubclass(annotation, FileModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin in (list, typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _submodels(arg)]
    return []


def strip_extra_keys(tree: Any, model: type[FileModel], source: str, root: yaml.Node | None,
                     problems: Problems, loc: tuple = ()) -> Any:
    """Drop ignored keys (noting them) and record unknown keys as problems, recursively.

    Returns:
        A copy of ``tree`` holding only the model's fields, ready for ``model_validate``.
    """
    if not isinstance(tree, dict):
        return tree
    fields = model.model_fields
    valid = [f.alias or name for name, f in fields.items()]
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if key in model.IGNORED:
            problems.ignored.append(f"{source}: {'.'.join(map(str, loc + (key,)))} ({model.IGNORED[key]})")
            continue
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid + list(model.IGNORED), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.add(source, root, loc + (key,), f"unknown key {key!r}{hint} Valid keys here: {', '.join(valid)}")
            continue
        subs = _submodels(fields[key].annotation) if key in fields else []
        if subs and isinstance(value, list):
            value = [strip_extra_keys(v, subs[0], source, root, problems, loc + (key, i)) for i, v in enumerate(value)]
        elif subs:
            value = strip_extra_keys(value, subs[0], source, root, problems, loc + (key,))
        out[key] = value
    return out


def parse_file_model(tree: Any, model: type[FileModel], source: str, root: yaml.Node | None,
                     problems: Problems, loc: tuple = ()) -> Any:
    """Validate ``tree`` against ``model``; on failure record every problem and return None."""
    clean = strip_extra_keys(tree, model, source, root, problems, loc)
    try:
        return model.model_validate(clean)
    except pydantic.ValidationError as e:
        for err in e.errors():
            where = loc + tuple(err["loc"])
            value = err.get("input")
            shown = "" if isinstance(value, dict) else f" (got {value!r})"
            problems.add(source, root, where, f"{err['msg']}{shown}")
        return None


def node_at(root: yaml.Node | None, loc: tuple) -> yaml.Node | None:
    """The YAML node at ``loc`` below ``root`` (for line numbers inside a section)."""
    node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if getattr(k, "value", None) == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return None
    return node


# --------------------------------------------------------------------------------------------
# The rank section (identical in benchmarkingjob.yaml and in a native benchmark file)

Direction = Literal["ascend", "descend"]


class Visualization(FileModel):
    mode: Literal["selected_only", "off"] = "selected_only"  # off: print nothing
    method: Literal["print_table"] = "print_table"


class SelectedDataItems(FileModel):
    """Which rows (``paradigms``) and columns (the rest) ``selected_rank`` keeps; ``["all"]``: all."""

    paradigms: list[str] = ["all"]
    modules: list[str] = ["all"]
    hyperparameters: list[str] = ["all"]
    metrics: list[str] = ["all"]


class RankSpec(FileModel):
    """Sorting, selection and output of the leaderboard (Ianvs ``rank``)."""

    sort_by: list[dict[str, Direction]] = Field(default_factory=list)  # first entry has priority
    visualization: Visualization = Visualization()
    selected_dataitem: SelectedDataItems = SelectedDataItems()
    save_mode: Literal["selected_and_all", "selected_only", "off"] = "selected_and_all"

    @field_validator("sort_by")
    @classmethod
    def _one_key_each(cls, value: list[dict[str, str]]) -> list[dict[str, str]]:
        for item in value:
            if len(item) != 1:
                raise ValueError(f"each sort_by entry is one {{metric: ascend|descend}}, got {item}")
        return value

    def sort_keys(self) -> list[tuple[str, str]]:
        """``[(column, "ascend" | "descend"), ...]`` in priority order."""
        return [next(iter(item.items())) for item in self.sort_by]


def check_rank_names(rank: RankSpec, columns: dict[str, list[str]], source: str, root: yaml.Node | None,
                     loc: tuple, problems: Problems) -> None:
    """Check that ``sort_by`` and ``selected_dataitem`` name columns that exist.

    Args:
        columns: ``{"metrics": [...], "modules": [...], "hyperparameters": [...], "paradigms": [...]}``.
    """
    sortable = columns["metrics"]
    for i, (name, _) in enumerate(rank.sort_keys()):
        if name not in sortable:
            close = difflib.get_close_matches(name, sortable, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.add(source, root, loc + ("sort_by", i),
                         f"cannot sort by {name!r}{hint} Sortable: {', '.join(sortable)}")
    selected = rank.selected_dataitem
    for kind in ("paradigms", "modules", "hyperparameters", "metrics"):
        names = getattr(selected, kind)
        for i, name in enumerate(names):
            if name != "all" and name not in columns[kind]:
                close = difflib.get_close_matches(name, columns[kind], n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                problems.add(source, root, loc + ("selected_dataitem", kind, i),
                             f"unknown {kind[:-1]} {name!r}{hint} Valid: all, {', '.join(columns[kind])}")
