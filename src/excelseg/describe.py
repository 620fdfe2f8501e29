"""Class descriptions from a large language model, for ExCEL's Text Semantic Enrichment (``excelseg describe``).

ExCEL enriches every class name with LLM-written visual descriptions. This module asks any OpenAI-compatible
chat-completions server (OpenAI, vLLM, llama.cpp server, ollama, ...) for them, through the official ``openai``
Python client (``pip install "excelseg[describe]"``, imported only when a run starts), and writes a knowledge
base::

    {"format": "excelseg-knowledge/1",
     "classes": {"forklift": {"descriptions": ["...", ...], "synonyms": []}, ...}}

Endpoint
    ``endpoint`` is the API base URL, the one that ends in ``/v1`` (``http://localhost:11434/v1`` for ollama,
    ``http://localhost:8000/v1`` for vLLM, ``https://api.openai.com/v1``); a trailing slash, or a URL that already
    ends in ``/chat/completions``, is tolerated. Each request is a chat completion with ``model``, ``messages``,
    ``temperature`` and ``max_tokens``; ``Authorization: Bearer <key>`` is sent only when an API key is given.
    Redirects are not followed (the key would travel elsewhere); the key never appears in logs, messages or
    files, and is redacted from any response text that is quoted in an error.

Prompt (``build_prompt``; ``{n}`` = number asked for, ``{name}`` = class name)
    ``SYSTEM_PROMPT`` and ``USER_PROMPT`` below. When some descriptions are already known (a top-up request),
    the user message says ``Write {n} more ...`` and appends ``EXCLUDE_PROMPT`` followed by them, one ``- `` line
    each (at most 40).

Parsing (``parse_descriptions``)
    ``<think>`` blocks, code fences, blank lines, markdown (``**``, ``__``, backticks, ``#`` headings, ``>``)
    and list markers (``1.``, ``1)``, ``(1)``, ``-``, ``*``, ``•``, ...) are removed, as are surrounding quotes;
    lines ending with ``:`` (a preamble) are dropped, and when most lines carry a list marker the unmarked ones
    (introductions, closing remarks) are dropped too. Sentences shorter than 3 or longer than 60 words are
    dropped; duplicates are removed ignoring case, punctuation and whitespace. When the answer was cut off
    (``finish_reason == "length"``) its last line is discarded.

Retries
    Every class has ``1 + retries`` requests in all. An answer with fewer than ``n`` new valid sentences uses one
    of them to ask again for the missing number (keeping what it has). HTTP 429, 408, 409 and 5xx, connection
    errors and timeouts (``timeout`` seconds per request) are retried by the openai client itself (its
    ``max_retries``), after ``backoff · 2^k`` seconds or the server's ``Retry-After`` (a longer one than 60 s is
    cut to 60 s, waited here); a request that got no answer at all (connection refused, timeout) is repeated
    without waiting, so a server that is down is reported at once. HTML or non-JSON bodies and bodies without
    ``choices[0].message.content`` are failed attempts too, asked again after the back-off. Any other 4xx
    (401 bad key, 404 wrong URL or model, ...) or a redirect stops the run at once with :class:`EndpointError`;
    a server that never answered at all for a whole class stops it with :class:`EndpointUnreachable`. A class
    still short after its requests is kept with what was obtained (a warning is logged and the summary says
    ``short``), so a later run tops it up.

Resume
    With ``out_path``, an existing file (this format, or the reference's plain ``{"class": ["sentence", ...]}``)
    is read first: requested classes that already have ≥ ``n`` descriptions are not asked again, those with
    fewer get only the missing ones, other classes in the file are kept. The file is rewritten atomically
    (:func:`excelseg.io.files.save_json`) after every class, so an interrupted run loses at most the class in
    progress. ``overwrite=True`` re-asks every requested class.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .chat_client import (
    INSTALL_HINT,
    MAX_WAIT,
    ChatClient,
    DescribeError,
    EndpointError,
    EndpointUnreachable,
    FailedAttempt,
    chat_url,
    require_openai,
)
from .knowledge import KNOWLEDGE_FORMAT, knowledge_entries
from .vocab import normalize_name

__all__ = [
    "INSTALL_HINT",
    "KNOWLEDGE_FORMAT",
    "DescribeError",
    "EndpointError",
    "EndpointUnreachable",
    "build_prompt",
    "chat_url",
    "describe_classes",
    "parse_descriptions",
    "require_openai",
]

_logger = logging.getLogger(__name__)

MIN_WORDS = 3
MAX_WORDS = 60
MAX_EXCLUDE = 40  # known descriptions quoted in a top-up prompt

SYSTEM_PROMPT = (
    "You write short visual descriptions of object categories for an image recognition system. "
    "You answer with the requested list only."
)
USER_PROMPT = (
    'Write {n}{more} short, distinct, visual descriptions of "{name}" as it appears in photographs. '
    "Each description is one sentence of 5 to 25 words about its appearance: its parts, colour, shape, "
    "material, or the typical setting it is seen in. Never name any other kind of object: describe only "
    "the {name} itself and its surroundings as a place. Put one description per line, numbered or "
    "bulleted. Write no other text: no title, no introduction, no closing remark."
)
EXCLUDE_PROMPT = "Do not repeat or rephrase these descriptions, which are already known:"


# --------------------------------------------------------------------------------------------------------------
# prompt and parsing


def build_prompt(class_name: str, n: int, exclude: Sequence[str] = ()) -> list[dict]:
    """Chat messages asking for ``n`` descriptions of ``class_name`` (``n`` more than ``exclude`` if given)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    name = " ".join(str(class_name).split())
    user = USER_PROMPT.format(n=n, more=" more" if exclude else "", name=name)
    if exclude:
        shown = list(exclude)[:MAX_EXCLUDE]
        user += "\n\n" + EXCLUDE_PROMPT + "\n" + "\n".join(f"- {d}" for d in shown)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


_THINK = re.compile(r"<think(?:ing)?>.*?(?:</think(?:ing)?>|\Z)", re.DOTALL | re.IGNORECASE)
_MARKER = re.compile(
    r"^(?:[-•·●○◦▪▫‣⁃–—]\s*|[*+]\s+"  # bullets
    r"|\(?\d{1,3}\s*[.):\]](?!\d)\s*"  # 1.  1)  (1)  1:  1]
    r"|\d{1,3}\s+[-–—]\s+)"  # 1 - text
)
_DOUBLE_QUOTES = "\"“”„«»"
_SINGLE_QUOTES = "'‘’`"
_PREAMBLE = re.compile(
    r"^(?:sure|certainly|of course|okay|ok|here (?:are|is)|here's|below (?:are|is))\b", re.IGNORECASE
)


def _dedup_key(text: str) -> str:
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def _strip_quotes(s: str) -> str:
    s = s.strip()
    for _ in range(2):
        s = s.strip(_DOUBLE_QUOTES + " ")
        # a quoted sentence followed by its full stop: "A yellow forklift".
        m = re.match(r"^(.*)[" + _DOUBLE_QUOTES + r"]([.!?])$", s)
        if m:
            s = m.group(1) + m.group(2)
        if len(s) >= 2 and s[0] in _SINGLE_QUOTES and s[-1] in _SINGLE_QUOTES:
            s = s[1:-1].strip()
    return s


def _clean_line(raw: str) -> tuple[str, bool]:
    """(text, had a list marker) of one answer line, markdown and markers removed."""
    s = raw.strip()
    s = re.sub(r"^(?:>\s*)+", "", s)
    s = re.sub(r"^#{1,6}\s+", "", s)
    s = s.replace("**", "").replace("__", "").replace("`", "")
    marked = False
    for _ in range(3):  # "- 1. text", "1. - text"
        m = _MARKER.match(s)
        if not m or m.end() == 0:
            break
        s = s[m.end():]
        marked = True
    s = re.sub(r"(?<![\w*])\*(?=\S)([^*]+?)(?<=\S)\*(?![\w*])", r"\1", s)  # *italic*
    s = _strip_quotes(s)
    return " ".join(s.split()), marked


def parse_descriptions(text: str, n: int | None = None) -> list[str]:
    """Valid, de-duplicated descriptions in an LLM answer, in order, at most ``n`` (all when ``None``)."""
    text = _THINK.sub("\n", text or "")
    lines = []
    for raw in text.splitlines():
        if not raw.strip() or raw.strip().startswith("```"):
            continue
        line, marked = _clean_line(raw)
        if line:
            lines.append((line, marked))
    n_marked = sum(marked for _, marked in lines)
    only_marked = n_marked > 0 and 2 * n_marked >= len(lines)
    out: list[str] = []
    seen: set[str] = set()
    for line, marked in lines:
        if only_marked and not marked:
            continue
        if line.endswith(":") or (not marked and _PREAMBLE.match(line)):
            continue
        words = len(line.split())
        if words < MIN_WORDS or words > MAX_WORDS:
            continue
        key = _dedup_key(line)
        if not key or key in seen:
            continue
        seen.add(key)
        out.append(line)
        if n is not None and len(out) >= n:
            break
    return out


# --------------------------------------------------------------------------------------------------------------
# knowledge file


def _load_existing(path: Path) -> dict | None:
    if not path.exists():
        return None
    if path.is_dir():
        raise ValueError(f"output {path} is a directory; give a .json file name")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"cannot read existing {path} to resume ({' '.join(str(exc).split())}); "
                         f"fix it or overwrite it") from None
    return knowledge_entries(obj, str(path), allow_empty=True)


def _write(path: Path, kb: dict) -> None:
    from .io.files import save_json

    save_json(path, kb, indent=2)


# --------------------------------------------------------------------------------------------------------------
# driver


def _check_positive(name: str, value: float, minimum: float = 0.0, strict: bool = True) -> None:
    ok = value > minimum if strict else value >= minimum
    if not ok:
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum:g}, got {value}")


def describe_classes(
    classes: str | Sequence[str],
    *,
    endpoint: str,
    model: str,
    n: int = 20,
    api_key: str | None = None,
    timeout: float = 60.0,
    retries: int = 5,
    backoff: float = 1.0,
    temperature: float = 0.7,
    max_tokens: int = 1024,
    out_path: str | os.PathLike | None = None,
    progress: Callable[[str, dict], None] | None = None,
    overwrite: bool = False,
    sleep: Callable[[float], None] = time.sleep,
) -> dict:
    """Ask ``model`` at ``endpoint`` for ``n`` visual descriptions of every class; see the module docstring.

    Args:
        classes: a comma list, a .txt/.json file of names, or a sequence (``excelseg.vocab.parse_class_list``).
        endpoint: API base URL ending in ``/v1``.
        api_key: sent as ``Authorization: Bearer``; ``None`` or empty sends no such header.
        timeout: seconds per request (the openai client's ``timeout``).
        retries: extra requests per class (errors and top-ups share them; the openai client's ``max_retries``
            is what is left of them).
        backoff: first back-off wait in seconds (doubled each failed attempt, capped at 60).
        out_path: knowledge-base JSON file, resumed from and rewritten atomically after every class.
        progress: ``progress(class_name, info)`` after each class, ``info`` being its summary entry.
        overwrite: re-ask classes already in ``out_path``.
        sleep: the wait before asking again after an unusable answer (the openai client waits itself
            between the retries it makes).

    Returns:
        ``{"knowledge": <excelseg-knowledge/1 dict>, "classes": {name: {"status": "complete" | "skipped" |
        "short" | "failed", "descriptions": int, "missing": int, "requests": int, "error": str | None}},
        "complete": [...], "short": [...], "failed": [...], "requests": int, "out": str | None}``
        (``complete`` includes skipped classes).

    Raises:
        DescribeError: the openai client is not installed.
        ValueError: bad arguments, or an ``out_path`` that cannot be resumed from.
        EndpointError: the endpoint refused a request (401, 404, ...): the run stops at once.
        EndpointUnreachable: no answer at all for a whole class.
        Classes finished before an exception are already in ``out_path``.
    """
    from .vocab import parse_class_list

    names = parse_class_list(classes)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
    _check_positive("timeout", timeout)
    _check_positive("backoff", backoff, strict=False)
    _check_positive("temperature", temperature, strict=False)
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    chat_url(endpoint)
    if not model or not str(model).strip():
        raise ValueError("model must be a non-empty model name")
    if api_key is not None:
        api_key = api_key.strip()
        if api_key and not all(33 <= ord(c) < 127 for c in api_key):
            raise ValueError("the API key contains spaces or non-ASCII characters; it cannot be sent in a header")

    path = Path(out_path) if out_path is not None else None
    kb: dict | None = None
    if path is not None:
        try:
            kb = _load_existing(path)
        except ValueError:
            if not overwrite:
                raise
            _logger.warning("%s cannot be read; it is replaced (overwrite)", path)
    if kb is None:
        kb = {"format": KNOWLEDGE_FORMAT, "classes": {}}
    client = ChatClient(endpoint, str(model).strip(), api_key, float(timeout), float(temperature), max_tokens,
                         float(backoff))
    try:
        return _describe_all(client, names, kb, path, n, retries, backoff, overwrite, progress, sleep)
    finally:
        client.close()


def _describe_all(client: ChatClient, names: list[str], kb: dict, path: Path | None, n: int, retries: int,
                  backoff: float, overwrite: bool, progress: Callable[[str, dict], None] | None,
                  sleep: Callable[[float], None]) -> dict:
    by_norm = {normalize_name(k): k for k in kb["classes"]}

    summary: dict[str, Any] = {"knowledge": kb, "classes": {}, "complete": [], "short": [], "failed": [],
                               "requests": 0, "out": str(path) if path is not None else None}
    for name in names:
        old_key = by_norm.get(normalize_name(name))
        entry = dict(kb["classes"].get(old_key, {})) if old_key is not None else {}
        have = [] if overwrite else list(entry.get("descriptions", []))
        if len(have) >= n:
            info = {"status": "skipped", "descriptions": len(have), "missing": 0, "requests": 0, "error": None}
            _logger.info("%s: %d descriptions already known, skipped", name, len(have))
        else:
            _logger.info("%s: asking %s for %d descriptions", name, client.model, n - len(have))
            descs, requests, error = _describe_one(client, name, have, n, retries, backoff, sleep)
            summary["requests"] += requests
            missing = max(0, n - len(descs))
            status = "complete" if not missing else ("failed" if not descs else "short")
            info = {"status": status, "descriptions": len(descs), "missing": missing, "requests": requests,
                    "error": error}
            if missing:
                why = f": {error}" if error else ""
                _logger.warning("%s: %d of %d descriptions after %d requests%s", name, len(descs), n, requests, why)
            if descs:
                entry["descriptions"] = descs
                entry.setdefault("synonyms", [])
                if old_key is not None and old_key != name:
                    del kb["classes"][old_key]
                kb["classes"][name] = entry
                by_norm[normalize_name(name)] = name
                if path is not None:
                    _write(path, kb)
        summary["classes"][name] = info
        summary["complete" if info["status"] in ("complete", "skipped") else info["status"]].append(name)
        if progress is not None:
            progress(name, info)
    return summary


def _describe_one(client: ChatClient, name: str, have: list[str], n: int, retries: int, backoff: float,
                  sleep: Callable[[float], None]) -> tuple[list[str], int, str | None]:
    """(descriptions, requests made, last error) for one class, topping ``have`` up to ``n``."""
    descs = list(have)
    keys = {_dedup_key(d) for d in descs}
    start = client.requests
    attempts = failures = 0
    answered = False
    error: str | None = None
    while len(descs) < n and attempts < 1 + retries:
        missing = n - len(descs)
        messages = build_prompt(name, missing, exclude=descs)
        try:
            text, finish = client.complete(messages, max_retries=retries - attempts)
        except FailedAttempt as exc:
            attempts = max(attempts + 1, client.requests - start)
            failures += 1
            error = str(exc)
            answered = answered or not exc.transport
            if attempts < 1 + retries:  # an unusable answer, or a status the client would not retry
                wait = exc.retry_after if exc.retry_after is not None else backoff * 2 ** (failures - 1)
                wait = min(MAX_WAIT, max(0.0, wait))
                _logger.warning("%s: attempt %d failed (%s); retrying in %.1f s", name, attempts, error, wait)
                sleep(wait)
            continue
        attempts = max(attempts + 1, client.requests - start)
        answered = True
        error = None
        if finish == "length":
            _logger.info("%s: answer cut off at max_tokens; its last line is dropped", name)
            text = text.rsplit("\n", 1)[0] if "\n" in text.strip() else ""
        added = _merge(descs, keys, parse_descriptions(text), n)
        _logger.info("%s: request %d gave %d new descriptions (%d of %d)", name, attempts, added, len(descs), n)
        if len(descs) < n and attempts < 1 + retries:
            _logger.info("%s: asking again for the %d missing", name, n - len(descs))
    if not answered and len(descs) < n:
        raise EndpointUnreachable(f"endpoint {client.endpoint} unreachable after {attempts} attempts: {error}")
    if error is None and len(descs) < n:
        error = f"the model gave {len(descs) - len(have)} usable new descriptions in {attempts} requests"
    return descs, attempts, error


def _merge(descs: list[str], keys: set[str], new: Iterable[str], n: int) -> int:
    added = 0
    for d in new:
        if len(descs) >= n:
            break
        key = _dedup_key(d)
        if key and key not in keys:
            keys.add(key)
            descs.append(d)
            added += 1
    return added
