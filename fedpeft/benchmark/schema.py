"""Typed YAML checking shared by both benchmark formats, and the ``rank`` section they share.

Every file model derives from :class:`FileModel`: unknown keys are errors naming the file, the
line, the key and the closest valid key; keys listed in a model's ``IGNORED`` (things Ianvs
uses and fedpeft does not need) are accepted and reported once. A
:class:`~fedpeft.problems.Problems` gathers every problem of every file so that one
:class:`~fedpeft.errors.ConfigError` lists them all.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import pydantic
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from fedpeft.problems import Problems, did_you_mean, submodels, unknown_key


class FileModel(BaseModel):
    """A mapping of a benchmark file. ``IGNORED``: accepted keys fedpeft does not use -> why."""

    model_config = ConfigDict(extra="forbid")
    IGNORED: ClassVar[dict[str, str]] = {}


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
            problems.add(source, loc + (key,), unknown_key(key, valid, model.IGNORED), root)
            continue
        subs = [m for m in submodels(fields[key].annotation) if issubclass(m, FileModel)] if key in fields else []
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
        problems.add_validation_error(e, model, source, root, loc)
        return None


def one_key_each(form: str) -> AfterValidator:
    """Validates a list of one-key mappings (Ianvs's ``- name: value`` lists); ``form`` shows one."""
    def check(value: list[dict]) -> list[dict]:
        for item in value:
            if len(item) != 1:
                raise ValueError(f"each entry is one {form}, got {list(item)}")
        return value
    return AfterValidator(check)


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

    sort_by: Annotated[list[dict[str, Direction]], one_key_each("{metric: ascend|descend}")] = Field(
        default_factory=list)  # first entry has priority
    visualization: Visualization = Visualization()
    selected_dataitem: SelectedDataItems = SelectedDataItems()
    save_mode: Literal["selected_and_all", "selected_only", "off"] = "selected_and_all"

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
            problems.add(source, loc + ("sort_by", i),
                         f"cannot sort by {name!r}{did_you_mean(name, sortable)} Sortable: {', '.join(sortable)}", root)
    selected = rank.selected_dataitem
    for kind in ("paradigms", "modules", "hyperparameters", "metrics"):
        names = getattr(selected, kind)
        for i, name in enumerate(names):
            if name != "all" and name not in columns[kind]:
                problems.add(source, loc + ("selected_dataitem", kind, i), f"unknown {kind[:-1]} {name!r}"
                             f"{did_you_mean(name, columns[kind])} Valid: all, {', '.join(columns[kind])}", root)
