"""Name -> object registries, with plugins from a Python file or a ``fedpeft.*`` entry point.

Aggregators, PEFT methods, metrics and partitioners each keep one :class:`Registry`. A config
names things by registry name (``aggregation: fedavgm``). A name may also be

* ``path/to/file.py:object`` (or ``path/to/file.py`` when the file defines exactly one object
  registered through :meth:`Registry.register` or sedna's ``ClassFactory``); ``object`` is a
  ``ClassFactory`` alias (how KubeEdge Ianvs finds a plugin) or a name the file defines. The file
  is imported with stand-ins for sedna's and Ianvs's modules (:mod:`fedpeft.plugin_stand_ins`), or
* the name of an entry point in the group ``fedpeft.<kind>`` (e.g. ``fedpeft.aggregators``)
  of any installed package.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Generic, TypeVar

from fedpeft.errors import RegistryError
from fedpeft.plugin_stand_ins import stand_ins
from fedpeft.problems import closest

T = TypeVar("T")
CLASS_FACTORY_ATTR = "__fedpeft_class_factory__"  # on a plugin module: what it registered with ClassFactory


def plugin_file(name: str) -> Path | None:
    """The Python file a registry ``name`` would import, resolved as :meth:`Registry.get` does.

    Args:
        name: A registered name, an entry-point name, or ``path/to/file.py[:object]``.

    Returns:
        The absolute, symlink-free path of the file (relative paths against the current
        directory), or ``None`` when ``name`` names no file.
    """
    if ".py" not in name:
        return None
    return Path(name.partition(".py")[0] + ".py").expanduser().resolve()


def describe_failure(name: str, what: str, error: BaseException) -> str:
    """One line for a plugin whose import or ``__init__`` raised: the exception and where.

    Args:
        name: The registry name as the config wrote it (``path/my_agg.py:MyAgg``).
        what: What failed (``"import"``, ``"__init__"``).
        error: The exception.

    Returns:
        ``"plugin 'x.py:Obj' failed in __init__: ValueError: bad (x.py:7: raise ValueError('bad'))"``;
        the place is the innermost frame inside the plugin's file when there is one.
    """
    where = ""
    if isinstance(error, SyntaxError) and error.filename:
        where = f" ({error.filename}:{error.lineno}: {(error.text or '').strip()})"
    else:
        frames = traceback.extract_tb(error.__traceback__)
        file = plugin_file(name)
        inside = [f for f in frames if file is not None and Path(f.filename).resolve() == file]
        frame = (inside or frames or [None])[-1]
        if frame is not None:
            where = f" ({frame.filename}:{frame.lineno}: {(frame.line or '').strip()})"
    return f"plugin {name!r} failed in {what}: {type(error).__name__}: {error}{where}"


class Registry(Generic[T]):
    """A named collection of factories of one kind.

    Args:
        kind: Plural noun used in errors and as the entry-point group suffix (``"aggregators"``).
        adapt: ``adapt(plugin, name) -> T`` applied to what a plugin file or entry point gives
            (metrics wrap Ianvs-style functions); it raises ``RegistryError`` for an unusable one.
    """

    def __init__(self, kind: str, adapt: Callable[[object, str], T] | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._adapt = adapt

    @property
    def entry_point_group(self) -> str:
        return f"fedpeft.{self.kind}"

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` (lower-case, unique)."""

        def deco(obj: T) -> T:
            key = name.lower()
            if key in self._items and self._items[key] is not obj:
                raise RegistryError(f"{self.kind} name {name!r} is already registered")
            self._items[key] = obj
            return obj

        return deco

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._items

    def get(self, name: str) -> T:
        """Look ``name`` up: registered name, ``file.py[:object]`` plugin, or entry point.

        Raises:
            RegistryError: if nothing matches; the message lists the valid names.
        """
        key = name.lower()
        if key in self._items:
            return self._items[key]
        plugin = self._load_file(name) if ".py" in name else self._load_entry_point(name)
        if plugin is None:
            raise RegistryError(self.unknown_message(name))
        return self._adapt(plugin, name) if self._adapt else plugin

    def unknown_message(self, name: str) -> str:
        """The error text for an unknown ``name``: closest match and every valid name."""
        close = closest(name.lower(), self.names())
        hint = f" Did you mean {close!r}?" if close else ""
        return (
            f"unknown {self.kind[:-1]} {name!r}.{hint} Valid names: {', '.join(self.names())}; "
            f"or a Python file 'path/to/file.py:object', or an entry point in group "
            f"{self.entry_point_group!r}."
        )

    def _load_file(self, spec: str) -> T:
        path = plugin_file(spec)
        assert path is not None
        attr = spec.partition(".py")[2].lstrip(":")
        if not path.is_file():
            raise RegistryError(f"{self.kind[:-1]} plugin file not found: {path} (from {spec!r})")
        before = dict(self._items)
        module = _import_file(path, f"fedpeft_plugin_{self.kind}_{path.stem}_{abs(hash(str(path)))}")
        aliases = getattr(module, CLASS_FACTORY_ATTR, {})
        if attr:
            if attr in aliases:  # Ianvs looks a plugin up by its ClassFactory alias
                return aliases[attr]
            if not hasattr(module, attr):
                public = [n for n in vars(module) if not n.startswith("_")]
                registered = f"; registered with ClassFactory: {', '.join(aliases)}" if aliases else ""
                raise RegistryError(f"{path} has no object {attr!r}; it defines: {', '.join(public)}{registered}")
            return getattr(module, attr)
        added = [v for k, v in self._items.items() if k not in before] or list(aliases.values())
        if len(added) == 1:
            return added[0]
        raise RegistryError(
            f"{path}: name the object to use as '{path}:NAME' (the file registered "
            f"{len(added)} {self.kind} through fedpeft's registry or ClassFactory, expected exactly 1)"
        )

    def _load_entry_point(self, name: str) -> T | None:
        for ep in importlib.metadata.entry_points(group=self.entry_point_group):
            if ep.name.lower() == name.lower():
                return ep.load()
        return None


def _import_file(path: Path, module_name: str) -> ModuleType:
    """Import ``path`` once as ``module_name``, with sedna's and Ianvs's imports stood in for
    (:mod:`fedpeft.plugin_stand_ins`); what it registers with ``ClassFactory`` is kept on the
    module as ``{alias: object}``."""
    module = sys.modules.get(module_name)
    if module is not None:
        return module
    mspec = importlib.util.spec_from_file_location(module_name, path)
    assert mspec is not None and mspec.loader is not None
    module = importlib.util.module_from_spec(mspec)
    sys.modules[module_name] = module
    try:
        with stand_ins() as registered:
            mspec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]  # a half-run module must not be found next time
        raise
    setattr(module, CLASS_FACTORY_ATTR, {k: v for items in registered.values() for k, v in items.items()})
    return module
