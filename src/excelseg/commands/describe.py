"""Visual descriptions of each class from an LLM, for Text Semantic Enrichment (excelseg describe).

Asks any OpenAI-compatible chat-completions server (OpenAI, vLLM, llama.cpp server, ollama) for N short visual
descriptions per class, through the official openai Python client (pip install "excelseg[describe]"), and
writes them as an excelseg knowledge base:
{"format": "excelseg-knowledge/1", "classes": {"<class>": {"descriptions": [...], "synonyms": []}}}.
--endpoint is the API base URL ending in /v1; /chat/completions is appended. The API key is read from the
environment variable named by --api-key-env (default OPENAI_API_KEY; none is sent when it is unset) and is
never printed. The prompt and parsing rules: python -c "import excelseg.describe as d; help(d)".
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from .common import CliError, ranged
from .run_folder import check_out_file

EXAMPLES = """examples:
  ollama pull llama3 && excelseg describe --classes "forklift,pallet" \\
      --endpoint http://localhost:11434/v1 --model llama3 --out kb.json
  excelseg describe --classes classes.txt --endpoint http://localhost:8000/v1 \\
      --model Qwen/Qwen2.5-7B-Instruct --out kb.json --n 30
  OPENAI_API_KEY=sk-... excelseg describe --classes voc_classes.txt \\
      --endpoint https://api.openai.com/v1 --model gpt-4o-mini --out voc_kb.json

Resume: classes already in --out with >= N descriptions are not asked again, shorter ones are topped up,
and the file is rewritten atomically after every class (--overwrite re-asks all).
Failed requests (HTTP 429/5xx, timeouts, non-JSON answers) are retried with exponential back-off (Retry-After
honoured); a refused connection is reported at once; 401/404 and other client errors stop at once.
Exit status: 0 every class has N descriptions, 1 some are short or failed (listed; a re-run tops them up),
2 usage/setup error (bad URL, no classes, endpoint refused or unreachable)."""

DEFAULT_KEY_ENV = "OPENAI_API_KEY"


def register(sub) -> None:
    p = sub.add_parser("describe", help="LLM-written visual descriptions of classes (knowledge base JSON)",
                       description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", required=True, help="class names: comma list or a .txt/.json file")
    p.add_argument("--endpoint", required=True,
                   help="OpenAI-compatible API base URL ending in /v1, e.g. http://localhost:11434/v1")
    p.add_argument("--model", required=True, help="model name as the server knows it, e.g. llama3")
    p.add_argument("--out", required=True, help="knowledge-base JSON to write (resumed when it exists)")
    p.add_argument("--n", type=ranged(int, 1, 1000), default=20, help="descriptions per class (default 20)")
    p.add_argument("--api-key-env", default=None, metavar="VAR",
                   help=f"environment variable holding the API key (default {DEFAULT_KEY_ENV}; "
                        "no key is sent when it is unset)")
    p.add_argument("--timeout", type=ranged(float, 0, 3600, low_open=True), default=60.0,
                   help="seconds per connect/read of a request (default 60)")
    p.add_argument("--retries", type=ranged(int, 0, 100), default=5,
                   help="extra requests per class for errors and missing descriptions (default 5)")
    p.add_argument("--backoff", type=ranged(float, 0, 60), default=1.0,
                   help="first retry wait in seconds, doubled each time, at most 60 (default 1)")
    p.add_argument("--temperature", type=ranged(float, 0, 2), default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--max-tokens", type=ranged(int, 1, 1000000), default=1024,
                   help="max tokens per answer (default 1024)")
    p.add_argument("--overwrite", action="store_true", help="re-ask classes already in --out")
    p.set_defaults(func=run)


def _api_key(var: str | None) -> str | None:
    name = var or DEFAULT_KEY_ENV
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        # never echo the value: it may be a key pasted by mistake
        raise CliError("--api-key-env takes the NAME of an environment variable (e.g. OPENAI_API_KEY), "
                       "not the key itself")
    value = os.environ.get(name)
    if value is None and var is not None:
        raise CliError(f"environment variable {name} (--api-key-env) is not set")
    return (value.strip() or None) if value else None


def run(args: argparse.Namespace) -> int:
    from ..describe import DescribeError, chat_url, describe_classes, require_openai
    from ..vocab import parse_class_list

    try:
        classes = parse_class_list(args.classes)
        chat_url(args.endpoint)
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None
    try:
        require_openai()
    except DescribeError as exc:
        raise CliError(str(exc)) from None
    if args.n < 1:
        raise CliError(f"--n must be >= 1, got {args.n}")
    if args.retries < 0:
        raise CliError(f"--retries must be >= 0, got {args.retries}")
    if args.timeout <= 0:
        raise CliError(f"--timeout must be > 0, got {args.timeout:g}")
    if args.backoff < 0:
        raise CliError(f"--backoff must be >= 0, got {args.backoff:g}")
    key = _api_key(args.api_key_env)
    out = Path(args.out)
    check_out_file(out, "kb.json")

    def progress(name: str, info: dict) -> None:
        k, req = info["descriptions"], info["requests"]
        plural = "request" if req == 1 else "requests"
        if info["status"] == "skipped":
            print(f"{name}: {k} descriptions already in {out} (skipped)", flush=True)
        elif info["status"] == "complete":
            print(f"{name}: {k} descriptions ({req} {plural})", flush=True)
        elif info["status"] == "short":
            print(f"{name}: only {k} of {args.n} descriptions ({req} {plural}): {info['error']}", flush=True)
        else:
            print(f"{name}: failed after {req} {plural}: {info['error']}", flush=True)

    try:
        summary = describe_classes(
            classes, endpoint=args.endpoint, model=args.model, n=args.n, api_key=key, timeout=args.timeout,
            retries=args.retries, backoff=args.backoff, temperature=args.temperature, max_tokens=args.max_tokens,
            out_path=out, progress=progress, overwrite=args.overwrite,
        )
    except DescribeError as exc:
        saved = f" (finished classes are in {out}; a re-run resumes)" if out.is_file() else ""
        raise CliError(f"{exc}{saved}") from None
    except ValueError as exc:
        raise CliError(str(exc)) from None

    n_done = len(summary["complete"])
    skipped = sum(1 for i in summary["classes"].values() if i["status"] == "skipped")
    extra = f", {skipped} already done" if skipped else ""
    print(f"done: {n_done} of {len(classes)} {'class has' if len(classes) == 1 else 'classes have'} "
          f"{args.n} descriptions{extra}; "
          f"{summary['requests']} requests -> {out}")
    bad = summary["short"] + summary["failed"]
    if not bad:
        return 0
    for name in bad:
        info = summary["classes"][name]
        print(f"incomplete: {name}: {info['descriptions']} of {args.n} descriptions", file=sys.stderr)
    noun = "class" if len(bad) == 1 else "classes"
    print(f"{len(bad)} {noun} incomplete ({', '.join(bad)}); run the same command again to top them up",
          file=sys.stderr)
    return 1
