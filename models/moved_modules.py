"""Old import paths of modules that moved into job folders keep working, with a warning naming the new place.

    import trainer.tasks ──MovedModuleFinder (first on sys.meta_path)──> import trainer.rl.tasks
                         ──> sys.modules["trainer.tasks"] is the SAME module object (one copy of its state)

A package lists its moves once (old full name -> new full name) and calls `alias_moved_modules` in its
`__init__`; nothing else imports an old path (tests/test_layout.py checks that, and that every move resolves).
Pickles and `pkg.mod:fn` strings written against an old path load too. Standard library only.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, old: str, new: str):
        self.old, self.new = old, new

    def create_module(self, spec):
        warnings.warn(f"{self.old} moved to {self.new}: import {self.new}", FutureWarning, stacklevel=2)
        return importlib.import_module(self.new)

    def exec_module(self, module) -> None:
        """The module was executed under its new name; nothing runs twice."""


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    def __init__(self, moves: dict[str, str]):
        self.moves = dict(moves)

    def find_spec(self, fullname, path=None, target=None):
        new = self.moves.get(fullname)
        return None if new is None else importlib.util.spec_from_loader(fullname, _AliasLoader(fullname, new))


def alias_moved_modules(moves: dict[str, str]) -> MovedModuleFinder:
    """Install one finder for these moves (idempotent per set of old names)."""
    circular = sorted(old for old, new in moves.items() if new == old or new.startswith(old + "."))
    if circular:
        raise ValueError(f"moved modules that would import themselves: {circular}")
    for finder in sys.meta_path:
        if isinstance(finder, MovedModuleFinder) and finder.moves.keys() == moves.keys():
            return finder
    finder = MovedModuleFinder(moves)
    sys.meta_path.insert(0, finder)
    return finder
