"""Deprecated import paths: names that moved keep working for one release, with a warning naming the new place.

Usage at the bottom of the old module::

    __getattr__ = moved(__name__, {"par": "excelseg.par"})
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def moved(old_module: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) that forwards each moved ``name`` to ``names[name]`` (a module path),
    warning ``DeprecationWarning`` once per access site; other names raise AttributeError as usual."""

    def __getattr__(name: str) -> Any:
        target = names.get(name)
        if target is None:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        warnings.warn(f"{old_module}.{name} moved to {target}.{name}; the old path goes away in the next release",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(target), name)

    return __getattr__
