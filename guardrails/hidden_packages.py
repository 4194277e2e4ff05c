"""Import a library while some packages look absent to it, or load only on first use, in this thread and import only."""

from __future__ import annotations

import importlib.abc
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any


class _AbsentFinder(importlib.abc.MetaPathFinder):
    """First on sys.meta_path: answers "no such module" for the hidden packages, defers everything else."""

    def __init__(self, packages: frozenset[str]) -> None:
        self.packages = packages
        # Other threads (the embedded runtime loading vLLM, say) must import these packages as usual meanwhile.
        self.thread = threading.get_ident()

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> ModuleSpec | None:
        package = fullname.partition(".")[0]
        # Once a package is loaded its cost is paid: hiding it, or a submodule of it, would only mislead the probe.
        if package in self.packages and package not in sys.modules and threading.get_ident() == self.thread:
            raise ModuleNotFoundError(f"No module named {fullname!r} (hidden by lockgate during this import)", name=fullname)
        return None


@contextmanager
def hidden_packages(packages: Sequence[str]) -> Iterator[None]:
    """Inside, `import P` (or P.sub) of a listed package not yet loaded raises ModuleNotFoundError in this thread.

    Only optional-dependency probes (`try: import P / except ImportError`) should meet it. A failed import
    leaves nothing in sys.modules, so `import P` after the block loads P normally; but modules imported
    inside keep whatever they concluded from its absence.
    """
    finder = _AbsentFinder(frozenset(packages))
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


class _DeferredModule(ModuleType):
    """A module whose code has not run yet: it runs, once, when a name the module does not hold yet is looked up."""

    def __getattr__(self, name: str) -> Any:
        loader = self.__dict__.get("__loader__")
        # Tools probe modules for special names (__wrapped__, __origin__...): only a star import's list is the code's.
        if (name.startswith("__") and name != "__all__") or not isinstance(loader, _DeferringLoader):
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        loader.run(self)
        try:
            return self.__dict__[name]
        except KeyError:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}") from None


class _DeferringLoader(importlib.abc.Loader):
    """Creates the module and leaves its code for later; names importers take from it at once stand in for the real ones."""

    def __init__(self, real: importlib.abc.Loader, forwarded: Sequence[str]) -> None:
        self.real = real
        self.forwarded = forwarded
        # Reentrant: the module's own code looks names up in itself while it runs, and must see them missing.
        self.lock = threading.RLock()
        self.done = False

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        return _DeferredModule(spec.name)

    def exec_module(self, module: ModuleType) -> None:
        for name in self.forwarded:
            module.__dict__[name] = _StandIn(module, name)

    def run(self, module: ModuleType) -> None:
        with self.lock:
            if self.done:
                return
            self.done = True
            # The real code replaces the stand-ins with the real names; stand-ins already handed out lead to those.
            self.real.exec_module(module)


class _StandIn:
    """A deferred module's name as its importers hold it: calling it or reading an attribute loads the module."""

    def __init__(self, module: ModuleType, name: str) -> None:
        self._module = module
        self._name = name

    def _real(self) -> Any:
        load_deferred(self._module)
        return self._module.__dict__[self._name]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._real()(*args, **kwargs)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._real(), attribute)


class _DeferringFinder(importlib.abc.MetaPathFinder):
    """First on sys.meta_path: finds the deferred modules as the other finders would, with a deferring loader."""

    def __init__(self, deferred: Mapping[str, Sequence[str]]) -> None:
        self.deferred = deferred
        self.thread = threading.get_ident()

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> ModuleSpec | None:
        forwarded = self.deferred.get(fullname)
        if forwarded is None or threading.get_ident() != self.thread:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is None or not hasattr(spec.loader, "exec_module"):
                    return None
                spec.loader = _DeferringLoader(spec.loader, forwarded)
                return spec
        return None


@contextmanager
def deferred_modules(deferred: Mapping[str, Sequence[str]]) -> Iterator[None]:
    """Inside, importing a listed module (not yet loaded) runs none of its code until one of its names is looked up.

    Each module maps to the names its importers take from it at import time (`from m import f`): those become
    stand-ins that load the module when called or when one of their attributes is read (so not for a class that
    is subclassed or checked with isinstance). A package's submodules stay importable meanwhile.
    """
    finder = _DeferringFinder(deferred)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def load_deferred(module: ModuleType) -> None:
    """Run a deferred module's code now (nothing for a module loaded as usual, or already run)."""
    loader = module.__dict__.get("__loader__")
    if isinstance(loader, _DeferringLoader):
        loader.run(module)
