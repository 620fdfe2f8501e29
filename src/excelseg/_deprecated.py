"""Old import paths kept for one release: a module-level ``__getattr__`` that forwards moved names with a warning.

Usage, in the module that lost the names::

    from ._deprecated import moved

    __getattr__ = moved(__name__, {"atomic_write": "excelseg.io.files", ...})

``old_module.atomic_write`` then imports ``excelseg.io.files`` (on first use, not before), emits a
``DeprecationWarning`` naming the new path and returns the object itself. A name the mapping lacks raises the usual
``AttributeError``. The table is ``__getattr__.moved``.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["moved"]


def moved(module: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``module`` forwarding each of ``names`` (name → new module path)."""
    table = dict(names)

    def __getattr__(name: str) -> Any:
        new = table.get(name)
        if new is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(f"{module}.{name} moved to {new}.{name}; import it from there ({module} keeps it for one "
                      "release)", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new), name)

    __getattr__.moved = table  # type: ignore[attr-defined]  # what is forwarded where (tests read it)
    return __getattr__


def names_of(module: str, names: str) -> dict[str, str]:
    """``{name: module}`` for the whitespace-separated ``names``: the mapping of :func:`moved`, briefly."""
    return dict.fromkeys(names.split(), module)
