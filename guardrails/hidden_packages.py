"""Import a library while some optional packages look absent to it, in this thread only and for that import only."""

from __future__ import annotations

import importlib.abc
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.machinery import ModuleSpec
from types import ModuleType


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
