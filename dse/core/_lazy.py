"""Lazy re-exports for the packages' ``__init__`` modules (Optuna style: a small public
surface whose names are imported on first use, so that importing one module of a package
does not load the others)."""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, modules: dict[str, str]) -> tuple[list[str], Callable[[str], object]]:
    """``(__all__, __getattr__)`` for ``package``: ``modules`` maps a module to the public names
    (space-separated) it defines."""
    where = {name: module for module, names in modules.items() for name in names.split()}

    def __getattr__(name: str):
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return sorted(where), __getattr__
