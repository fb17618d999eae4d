"""A registry of kinds: drafter types (adapters/registry.py) and VLM backends (vlms/registry.py).

Entries register under their `kind`; a kind asked for before anything registered it is looked up as a
module named after it (the module registers it when imported), so a built-in kind needs no list of its
own and a kind defined elsewhere (a test, a plugin) registers itself before use.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from typing import Generic, TypeVar

from specalign.errors import DataError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str, key: str, module: str):
        """what: a name for the error ("drafter type"); key: the config key that names a kind
        ("adapter.kind"); module: the module of a kind, "{}" standing for it ("specalign.adapters.{}")."""
        self.what, self.key, self.module = what, key, module
        self.entries: dict[str, T] = {}

    def add(self, kind: str, entry: T) -> None:
        """Register `entry` as `kind` (a second registration of a kind replaces the first)."""
        self.entries[kind] = entry

    def get(self, kind: str, key: str | None = None) -> T:
        """The entry of `kind`; a one-line DataError naming `key` (default: the registry's) if there is none."""
        if kind not in self.entries and isinstance(kind, str) and kind.isidentifier():
            self._import(self.module.format(kind))
        if kind not in self.entries:
            raise DataError(key or self.key, f"unknown {self.what} {kind!r} (known: {', '.join(self.known())})",
                            f"give a kind with a module {self.module.format('<kind>')}, or register it first")
        return self.entries[kind]

    __getitem__ = get

    def known(self) -> list[str]:
        """Every kind: the registered ones and those of the package's modules that match the pattern."""
        package, _, name = self.module.rpartition(".")
        pattern = re.compile(re.escape(name).replace(r"\{\}", r"\w+") + "$")
        for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
            if pattern.match(info.name):
                self._import(f"{package}.{info.name}")
        return sorted(self.entries)

    @staticmethod
    def _import(module: str) -> None:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
