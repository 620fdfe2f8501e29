"""Old import paths of the plumbing (issue #20: io/, train/, jobs/) keep working for one release, with a
DeprecationWarning naming the new path; nothing in the repository uses them."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OLD = ["excelseg.outputs", "excelseg.images", "excelseg.batch", "excelseg.training", "excelseg.optim",
       "excelseg.interop", "excelseg.train", "excelseg.devices"]


def test_an_old_path_warns_and_gives_the_same_object():
    import excelseg.io.files
    import excelseg.outputs

    with pytest.warns(DeprecationWarning, match=r"excelseg\.outputs\.atomic_write moved to excelseg\.io\.files"):
        fn = excelseg.outputs.atomic_write
    assert fn is excelseg.io.files.atomic_write
    with pytest.warns(DeprecationWarning, match="excelseg.jobs.runner.Shard"):
        from excelseg.batch import Shard
    assert Shard.parse("1/2").world == 2


def test_every_forwarded_name_exists_and_unknown_names_still_fail():
    for name in OLD:
        module = importlib.import_module(name)
        for attr, new in module.__getattr__.moved.items():
            with pytest.warns(DeprecationWarning):
                assert getattr(module, attr) is getattr(importlib.import_module(new), attr)
        with pytest.raises(AttributeError):
            module.no_such_name  # noqa: B018


def _old_imports(path: Path) -> list[str]:
    """``module.name`` of every import in ``path`` that goes through a deprecated alias."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    rel = path.relative_to(ROOT / "src").with_suffix("").parts if path.is_relative_to(ROOT / "src") else None
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        target = node.module or ""
        if node.level and rel is not None:
            package = list(rel[:-1])  # the file's package (also for an __init__.py)
            base = package[:len(package) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        if target in OLD:
            module = importlib.import_module(target)
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {target}.{a.name}" for a in node.names
                      if a.name not in vars(module)]
    return found


def test_nothing_in_the_repository_uses_an_old_path():
    files = [p for d in ("src", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py")
             if p.name != "test_deprecated.py"]
    assert [hit for p in files for hit in _old_imports(p)] == []
