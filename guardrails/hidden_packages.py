"""Import a library while some packages look absent to it, or load only on first use, in this thread and import only."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
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
        load_deferred(self)
        current = sys.modules.get(self.__name__)
        if current is not None and current is not self:
            return getattr(current, name)
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
    """A deferred module's name as its importers hold it: calling it, reading an attribute, subclassing it or checking
    an instance against it loads the module."""

    def __init__(self, module: ModuleType, name: str) -> None:
        self._module = module
        self._name = name

    def _real(self) -> Any:
        load_deferred(self._module)
        name = self._module.__name__
        if sys.modules.get(name) is self._module:
            return self._module.__dict__[self._name]
        # Imported afresh by its package's own code (see load_deferred), or by this import if that code did not.
        return getattr(importlib.import_module(name), self._name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._real()(*args, **kwargs)

    def __instancecheck__(self, instance: Any) -> bool:
        return isinstance(instance, self._real())

    def __subclasscheck__(self, subclass: type) -> bool:
        return issubclass(subclass, self._real())

    def __mro_entries__(self, bases: tuple[Any, ...]) -> tuple[Any, ...]:
        return (self._real(),)

    def __getattr__(self, attribute: str) -> Any:
        # typing probes what it is given (List[Doc] asks for __typing_subst__): a probe must not load the module.
        if attribute.startswith("__"):
            raise AttributeError(attribute)
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


class _Imported(importlib.abc.Loader):
    """Hands the import system a module that is already there, keeping its own spec."""

    def __init__(self, module: ModuleType) -> None:
        self.module = module
        self.spec = module.__spec__

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        return self.module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self.spec


class _PackageFirst(importlib.abc.MetaPathFinder):
    """Once the deferring is over, a submodule imported from a package still deferred runs the package's code
    first, as a plain import would (the package may import that submodule itself: then that one is the import)."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> ModuleSpec | None:
        root_name, dot, _ = fullname.partition(".")
        root = sys.modules.get(root_name) if dot else None
        if root is None or not _pending(root) or _deferring_in_this_thread():
            return None
        load_deferred(root)
        module = sys.modules.get(fullname)
        return None if module is None else importlib.util.spec_from_loader(fullname, _Imported(module))


_PACKAGE_FIRST = _PackageFirst()


def _deferring_in_this_thread() -> bool:
    me = threading.get_ident()
    return any(isinstance(finder, _DeferringFinder) and finder.thread == me for finder in sys.meta_path)


@contextmanager
def deferred_modules(deferred: Mapping[str, Sequence[str]]) -> Iterator[None]:
    """Inside, importing a listed module (not yet loaded) runs none of its code until one of its names is looked up.

    Each module maps to the names its importers take from it at import time (`from m import f`): those become
    stand-ins that load the module when called, subclassed, checked against or when one of their attributes is
    read (a probe for a special name, as typing makes, loads nothing). A package's submodules stay importable
    meanwhile.
    """
    finder = _DeferringFinder(deferred)
    if _PACKAGE_FIRST not in sys.meta_path:
        sys.meta_path.insert(0, _PACKAGE_FIRST)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def load_deferred(module: ModuleType) -> None:
    """Run a deferred module's code now (nothing for a module loaded as usual, or already run).

    A package's code runs first, as in a plain import: its submodules import from it, and compiled ones take their
    types from each other's modules as they find them. So when a package deferred with some of its submodules runs,
    those submodules are dropped first and imported afresh by its code; their stand-ins lead to the fresh ones.
    """
    root = sys.modules.get(module.__name__.split(".", 1)[0])
    if root is not None and _pending(root):
        prefix = f"{root.__name__}."
        for name in [name for name, sub in sys.modules.items() if name.startswith(prefix) and _pending(sub)]:
            del sys.modules[name]
        root.__dict__["__loader__"].run(root)
    if module is root:
        return
    if sys.modules.get(module.__name__) is not module:
        importlib.import_module(module.__name__)
    elif _pending(module):
        module.__dict__["__loader__"].run(module)


def _pending(module: ModuleType) -> bool:
    loader = getattr(module, "__dict__", {}).get("__loader__")
    return isinstance(loader, _DeferringLoader) and not loader.done
