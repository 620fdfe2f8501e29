"""The documentation: README.md is a short front page, every relative link resolves, the offline examples run.

A fenced block right after the line ``<!-- runnable -->`` is executed (docs/tests.md, "Documentation tests"):

* ``console``: each ``$ `` line (a trailing ``\\`` continues it) is one shell command, run with ``sh -c`` in
  a fresh temporary folder per page with ``EXCELSEG_OFFLINE=1``; ``excelseg`` and ``python`` are this
  interpreter's. It must exit with status 0, and the lines shown under it must appear in its output
  (stdout and stderr) in that order: a line ``…`` separates groups of lines that must be consecutive, and
  ``…`` inside a line stands for any text.
* ``python``: the block runs as a script, in this process, in the page's temporary folder.

A block after ``<!-- runnable after build_model -->`` is only compiled until the marker is switched.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 160
RUNNABLE = "<!-- runnable -->"
PENDING = "<!-- runnable after build_model -->"
ELLIPSIS = "…"
COMMAND_TIMEOUT_S = 300


# ---- markdown parsing --------------------------------------------------------------------------------------

_FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+\1")
_HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    body: list[str]
    marker: str | None  # RUNNABLE, PENDING or None


def _blocks_and_prose(page: Path) -> tuple[list[Block], list[tuple[int, str]]]:
    """Fenced blocks (with the marker on the line before them) and the prose lines outside them."""
    lines = page.read_text(encoding="utf-8").split("\n")
    blocks, prose = [], []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        fence, start = m.group(1), i
        prev = lines[i - 1].strip() if i > 0 else ""
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            i += 1
        blocks.append(Block(page, start + 1, m.group(2), lines[start + 1:i],
                            prev if prev in (RUNNABLE, PENDING) else None))
        i += 1
    return blocks, prose


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: rendered text, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for _, line in _blocks_and_prose(page)[1]:
        anchors.update(_HTML_ANCHOR.findall(line))
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(1))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of every markdown link and image in the prose (code spans and blocks excluded)."""
    return [(n, target) for n, line in _blocks_and_prose(page)[1]
            for target in _LINK.findall(_CODE_SPAN.sub("code", line))]


# ---- (a) the front page and the links ----------------------------------------------------------------------


def test_readme_is_a_short_front_page():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md: {n} lines (at most {README_MAX_LINES}); move details to docs/"
    linked = {target.split("#")[0] for _, target in _links(README)}
    missing = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


def test_slug_follows_github():
    assert _slug("`excelseg cam` — training-free CAMs and pseudo-labels") == \
        "excelseg-cam--training-free-cams-and-pseudo-labels"
    assert _slug("Training (`excelseg train`) and reproducing the paper") == \
        "training-excelseg-train-and-reproducing-the-paper"
    assert _slug("Install, CLIP weights, [cam](x.md)") == "install-clip-weights-cam"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    bad = []
    for line, target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto: …
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(ROOT)}:{line}: {target}"
        if not dest.exists():
            bad.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{where} (no heading or anchor #{anchor} in {dest.name})")
    assert not bad, "broken links:\n" + "\n".join(bad)


# ---- (b) the offline examples ------------------------------------------------------------------------------


def _marked(marker: str) -> list[Block]:
    return [b for p in PAGES for b in _blocks_and_prose(p)[0] if b.marker == marker]


def _commands(block: Block) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) of a console block."""
    out: list[tuple[str, list[str]]] = []
    pending = ""
    for raw in block.body:
        line = raw.rstrip()
        if pending or line.startswith("$ "):
            text = line[2:] if not pending else line.strip()
            if text.endswith("\\"):
                pending += text[:-1].rstrip() + " "
                continue
            out.append((pending + text, []))
            pending = ""
        elif line:
            assert out, f"{block.page.name}:{block.line}: a console block starts with a '$ ' command"
            out[-1][1].append(line)
    assert out and not pending, f"{block.page.name}:{block.line}: no complete '$ ' command"
    return out


def _line_pattern(line: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in line.split(ELLIPSIS)))


def _missing_output(expected: list[str], output: str) -> str | None:
    """The first expected line not found (None: all found). Groups separated by '…' lines are found in order,
    the lines of a group consecutively."""
    actual = [ln.rstrip() for ln in re.split(r"[\r\n]+", output)]
    groups: list[list[str]] = [[]]
    for line in expected:
        if line.strip() == ELLIPSIS:
            groups.append([])
        else:
            groups[-1].append(line)
    pos = 0
    for group in filter(None, groups):
        patterns = [_line_pattern(line) for line in group]
        for start in range(pos, len(actual) - len(group) + 1):
            if all(p.fullmatch(actual[start + k]) for k, p in enumerate(patterns)):
                pos = start + len(group)
                break
        else:
            return "\n".join(group)
    return None


def _shell_env(tmp: Path) -> dict[str, str]:
    """``excelseg`` and ``python`` on PATH are this interpreter with this checkout's package; offline; one
    torch thread."""
    import excelseg

    bin_dir = tmp / ".bin"
    bin_dir.mkdir()
    for name, module in (("excelseg", "excelseg.cli"), ("python", None)):
        shim = bin_dir / name
        run = f'"{sys.executable}" -m {module}' if module else f'"{sys.executable}"'
        shim.write_text(f'#!/bin/sh\nexec {run} "$@"\n')
        shim.chmod(0o755)
    src = str(Path(excelseg.__file__).resolve().parents[1])
    env = dict(os.environ)
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", EXCELSEG_OFFLINE="1", HF_HUB_OFFLINE="1",
               LC_ALL="C", OMP_NUM_THREADS="1", NO_COLOR="1",
               PYTHONPATH=os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")])))
    env.pop("EXCELSEG_CLIP", None)
    return env


def _run_console(block: Block, work: Path, env: dict[str, str]) -> None:
    for command, expected in _commands(block):
        where = f"{block.page.relative_to(ROOT)}:{block.line}: $ {command}"
        t0 = time.perf_counter()
        proc = subprocess.run(["sh", "-c", command], check=False, cwd=work, env=env, capture_output=True,
                              text=True, encoding="utf-8", errors="replace", timeout=COMMAND_TIMEOUT_S)
        output = proc.stdout + "\n" + proc.stderr
        print(f"{time.perf_counter() - t0:6.1f} s  {where}")
        assert proc.returncode == 0, f"{where}\nexit status {proc.returncode}\n{output[-3000:]}"
        missing = _missing_output(expected, output)
        assert missing is None, (f"{where}\nthe docs show, and the output lacks:\n{missing}\n"
                                 f"--- output:\n{output[-3000:]}")


def _run_python(block: Block, work: Path, monkeypatch) -> None:
    code = compile("\n".join(block.body), f"{block.page.relative_to(ROOT)}:{block.line}", "exec")
    monkeypatch.chdir(work)
    t0 = time.perf_counter()
    exec(code, {"__name__": "__docs__"})  # noqa: S102 -- the documentation's own example, run as a test
    print(f"{time.perf_counter() - t0:6.1f} s  {block.page.relative_to(ROOT)}:{block.line}: python")


def test_runnable_examples_are_marked():
    runnable = _marked(RUNNABLE)
    assert {b.page.name for b in runnable} >= {"README.md"}, "README.md lost its runnable examples"
    langs = [(b.page.name, b.line, b.lang) for b in runnable]
    assert {b.lang for b in runnable} <= {"console", "python"}, langs
    assert all(b.lang in ("console", "python") for b in _marked(PENDING))


@pytest.mark.skipif(os.name != "posix", reason="the console examples are POSIX shell commands")
@pytest.mark.parametrize("page", sorted({b.page for b in _marked(RUNNABLE)}),
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_offline_examples_run(page, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    env = _shell_env(tmp_path)
    monkeypatch.setenv("EXCELSEG_OFFLINE", "1")
    for block in _marked(RUNNABLE):
        if block.page != page:
            continue
        if block.lang == "console":
            _run_console(block, work, env)
        else:
            _run_python(block, work, monkeypatch)


def test_pending_examples_compile():
    """Blocks waiting for an API (``<!-- runnable after build_model -->``) at least parse."""
    for block in _marked(PENDING):
        assert block.lang == "python", f"{block.page.name}:{block.line}"
        compile("\n".join(block.body), f"{block.page.relative_to(ROOT)}:{block.line}", "exec")


def test_output_matching():
    out = "progress 10%\rprogress 100%\ndone: 4 written in 0.4 s -> out\na\nb\nc\n"
    assert _missing_output(["done: 4 written in … -> out"], out) is None
    assert _missing_output(["a", "b"], out) is None
    assert _missing_output(["a", "…", "c"], out) is None
    assert _missing_output(["a", "c"], out) == "a\nc"  # consecutive within a group
    assert _missing_output(["b", "…", "a"], out) == "a"  # groups in order
