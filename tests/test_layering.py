"""The layering of the package (docs/architecture.md "Layout"): the method core imports nothing from the
applications above it (train/, jobs/, app/, commands/, the CLI, describe, evaluation, the synthetic world) and,
from the plumbing below it (io/), only readers — images, checkpoints — and the atomic writer of the bank cache.
Read from the source with ``ast``: an import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "excelseg"
APPLICATIONS = ("train", "jobs", "app", "commands", "cli", "describe", "chat_client", "evaluation", "synthetic",
                "data")
CORE = ["_deprecated", "_messages", "_version", "backbone", "bank", "build", "calibration", "cam", "config", "crf",
        "devices", "features", "heads", "kmeans", "losses", "lvc", "metrics", "model", "par", "predictor", "preprocess",
        "pseudo", "refine", "segmenter", "text", "vocab", "interop", "knowledge", "weights", "_native", "_triton_par"]
IO_ALLOWED = {"io.images", "io.checkpoint", "io.files:atomic_path"}


def _files(name: str) -> list[Path]:
    path = PKG / name
    return sorted(path.rglob("*.py")) if path.is_dir() else [PKG / f"{name}.py"]


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module path relative to excelseg, imported names) of every import in ``path``."""
    rel = path.relative_to(PKG).with_suffix("").parts
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel[: len(rel) - node.level])
                mod = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("excelseg"):
                mod = node.module[len("excelseg."):] if node.module != "excelseg" else ""
            else:
                continue
            out.append((mod, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name[len("excelseg."):], []) for a in node.names if a.name.startswith("excelseg.")]
    return out


def _violations(name: str) -> list[str]:
    bad = []
    for path in _files(name):
        for mod, names in _imports(path):
            top = mod.split(".")[0]
            targets = [mod] + [f"{mod}.{n}" for n in names]
            if top in APPLICATIONS or any(t.split(".")[0] in APPLICATIONS for t in targets if mod == ""):
                bad.append(f"{path.relative_to(PKG)} imports excelseg.{mod}")
            if top == "io":
                ok = mod in IO_ALLOWED or all(f"{mod}:{n}" in IO_ALLOWED for n in names)
                if not ok:
                    bad.append(f"{path.relative_to(PKG)} imports excelseg.{mod} {names}")
    return bad


@pytest.mark.parametrize("name", CORE)
def test_the_core_imports_nothing_above_it(name):
    assert _violations(name) == []


def test_the_check_sees_a_violation(tmp_path, monkeypatch):
    """The checker finds an import that runs up (so the test above can fail)."""
    fake = tmp_path / "excelseg"
    fake.mkdir()
    (fake / "model.py").write_text("def f():\n    from .train.step import training_losses\n"
                                   "from .io.files import save_json\n")
    monkeypatch.setattr(__import__(__name__), "PKG", fake)
    assert len(_violations("model")) == 2


def test_every_module_is_placed():
    """Each top-level module or package is either core or an application (a new file must be placed)."""
    names = {p.stem for p in PKG.glob("*.py")} | {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()}
    shims = {"batch", "images", "optim", "outputs", "training"}  # old paths forwarding for one release
    placed = set(CORE) | set(APPLICATIONS) | shims | {"__init__", "io", "viz", "samples"}
    assert names - placed == set()
