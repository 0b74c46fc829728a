"""Finding plugins by name: built-ins, installed entry points, and files the spec lists.

A plugin is code that runs with the user's rights: fedsoda only loads the entry points of installed
packages and the files that the spec's `plugins` key names, never anything from artifacts or clients.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from fedsoda_cli.errors import PluginError

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Name -> plugin class for one kind of plugin (aggregators or pruners)."""

    def __init__(self, kind: str, group: str, base: type, builtins: dict[str, str]):
        self.kind, self.group, self.base = kind, group, base
        self._lazy = dict(builtins)  # name -> "module:attr", imported on first use
        self._classes: dict[str, type] = {}
        # name -> (target "module:attr", where it came from), to refuse a second, different owner of a name
        self._owners: dict[str, tuple[str, str]] = {name: (target, f"built-in {target}") for name, target in builtins.items()}
        self._entry_points_loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: `@aggregators.register("fedadam")`."""

        def decorate(cls: T) -> T:
            self._check(name, cls)
            self._load_entry_points()
            self._claim(name, f"{cls.__module__}:{cls.__qualname__}", _origin(cls))
            self._classes[name] = cls
            self._lazy.pop(name, None)
            return cls

        return decorate

    def get(self, name: str) -> type:
        self._load_entry_points()
        if name in self._classes:
            return self._classes[name]
        if name in self._lazy:
            cls = self._check(name, _import_attr(self._lazy[name], f"{self.kind} '{name}'"))
            self._classes[name] = cls
            return cls
        raise PluginError(f"unknown {self.kind} '{name}'{self._suggestion(name)}; registered: {', '.join(self.names())}")

    def create(self, name: str, **kwargs):
        cls = self.get(name)
        try:
            return cls(**kwargs)
        except Exception as exc:  # a plugin's constructor is third-party code
            raise PluginError(
                f"{self.kind} '{name}' ({cls.__module__}) failed to start: {type(exc).__name__}: {exc}; "
                "fix the options the spec gives it (e.g. federate.aggregator_options) or the plugin"
            ) from None

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted({*self._classes, *self._lazy})

    def _suggestion(self, name: str) -> str:
        close = difflib.get_close_matches(name, self.names(), n=2, cutoff=0.5)
        return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""

    def _check(self, name: str, cls: object) -> type:
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise PluginError(
                f"{self.kind} '{name}' must be a subclass of {self.base.__module__}.{self.base.__name__}, got {cls!r}"
            )
        return cls

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for entry in importlib.metadata.entry_points(group=self.group):
            package = getattr(entry.dist, "name", None) or "an installed package"
            self._claim(entry.name, entry.value, f"entry point {entry.value} of {package}")
            if entry.name not in self._classes:
                self._lazy.setdefault(entry.name, entry.value)

    def _claim(self, name: str, target: str, origin: str) -> None:
        """Record who provides `name`; a second provider with another target is refused, since
        silently letting the last one win would run different code under a name the spec trusts.
        The same target again (a plugin file imported anew, an older fedsoda install whose metadata
        still lists the built-ins as entry points) is the same plugin."""
        owner = self._owners.get(name)
        if owner is not None and owner[0] != target:
            raise PluginError(
                f"{self.kind} '{name}' is registered twice: by {owner[1]} and by {origin}; "
                "give the plugin another name, or remove one of them"
            )
        self._owners.setdefault(name, (target, origin))


def _origin(cls: type) -> str:
    """Where a registered class comes from: its file when it has one (plugin files get generated module names)."""
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    return f"{path} ({cls.__qualname__})" if path else f"{cls.__module__}:{cls.__qualname__}"


def _import_attr(target: str, what: str) -> object:
    module_name, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (Exception, SystemExit) as exc:
        raise PluginError(f"{what} could not be loaded from {target}: {type(exc).__name__}: {exc}") from None


def load_plugin_files(paths: list[str], base_dir: Path) -> None:
    """Import each plugin file the spec lists, so that its `register` decorators run."""
    for raw in paths:
        path = (base_dir / raw).resolve()
        if not path.is_file():
            raise PluginError(f"plugin file {path} not found (spec key 'plugins'); give a path relative to the spec")
        module_name = f"fedsoda_plugin_{path.stem}_{abs(hash(str(path))) % 10**8}"
        if module_name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:  # not a suffix Python imports (.py, ...)
            raise PluginError(f"plugin file {path} is not a Python module (spec key 'plugins'); give a .py file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except PluginError as exc:
            del sys.modules[module_name]
            raise PluginError(f"plugin file {path}: {exc}") from None
        except SystemExit as exc:
            # sys.exit() at import would otherwise end validate or run with its code, often 0, having done nothing.
            del sys.modules[module_name]
            raise PluginError(
                f"plugin file {path} called sys.exit({exc.code!r}) while being imported; "
                "a plugin file must only define and register classes"
            ) from None
        except Exception as exc:
            del sys.modules[module_name]
            raise PluginError(
                f"plugin file {path} failed to import: {type(exc).__name__}: {exc}; fix the file or remove it from 'plugins'"
            ) from None
