"""excelseg describe: LLM class descriptions over a scripted OpenAI-compatible server on 127.0.0.1.

The requests go through the real openai client (the ``describe`` extra), pointed at the local server."""

from __future__ import annotations

import itertools
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from excelseg.cli import main
from excelseg.describe import (
    INSTALL_HINT,
    KNOWLEDGE_FORMAT,
    DescribeError,
    EndpointError,
    EndpointUnreachable,
    build_prompt,
    chat_url,
    describe_classes,
    parse_descriptions,
)

KEY = "sk-test-SECRET-0123456789abcdef"
KEY_ENV = "EXCELSEG_TEST_LLM_KEY"


# --------------------------------------------------------------------------------------------------------------
# scripted server


class Script:
    """Responses popped one per request (status, headers, body, delay) and the requests seen."""

    def __init__(self) -> None:
        self.responses: list[tuple] = []
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.base = ""

    def add(self, body="", status=200, headers=None, delay=0.0):
        self.responses.append((status, dict(headers or {}), body, delay))
        return self

    def chat(self, text, finish="stop", **kw):
        return self.add(chat_body(text, finish), headers={"Content-Type": "application/json"}, **kw)

    def prompts(self) -> list[str]:
        return [r["json"]["messages"][-1]["content"] for r in self.requests]

    def gaps(self) -> list[float]:
        """Seconds between consecutive requests."""
        times = [r["time"] for r in self.requests]
        return [b - a for a, b in itertools.pairwise(times)]


def chat_body(text: str, finish: str = "stop") -> str:
    return json.dumps({"id": "c1", "object": "chat.completion", "model": "m",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                    "finish_reason": finish}]})


@pytest.fixture
def server():
    pytest.importorskip("openai")
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            with script.lock:
                script.requests.append({"path": self.path, "method": self.command, "json": body,
                                        "time": time.monotonic(),
                                        "headers": {k.lower(): v for k, v in self.headers.items()}})
                item = script.responses.pop(0) if script.responses else (418, {}, "unscripted request", 0.0)
            status, headers, payload, delay = item
            if callable(payload):
                payload = payload(self.headers)
            if delay:
                time.sleep(delay)
            data = payload.encode("utf-8")
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.handle_error = lambda request, address: None  # a client that timed out closed its socket: fine
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    script.base = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    try:
        yield script
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def _no_proxy_no_key(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv(KEY_ENV, raising=False)


def sents(word: str, k: int, start: int = 0) -> list[str]:
    return [f"The {word} shows visual detail number {i} in the photo." for i in range(start, start + k)]


def numbered(lines) -> str:
    return "\n".join(f"{i + 1}. {s}" for i, s in enumerate(lines))


def describe(server, classes="forklift", **kw):
    opts = {"endpoint": server.base, "model": "test-model", "n": 20, "retries": 2, "backoff": 0.01,
            "timeout": 5.0}
    opts.update(kw)
    return describe_classes(classes, **opts)


def cli(server_or_url, *extra, out=None, classes="forklift,pallet"):
    url = server_or_url if isinstance(server_or_url, str) else server_or_url.base
    args = ["describe", "--classes", classes, "--endpoint", url, "--model", "test-model", "--out", str(out),
            "--backoff", "0.01", "--timeout", "5", *extra]
    return main(args)


def read(path):
    return json.loads(path.read_text(encoding="utf-8"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------------------
# prompt and parsing


def test_build_prompt_asks_for_n_visual_descriptions():
    msgs = build_prompt("forklift", 20)
    assert [m["role"] for m in msgs] == ["system", "user"]
    user = msgs[1]["content"]
    assert user.startswith('Write 20 short, distinct, visual descriptions of "forklift"')
    for word in ("colour", "shape", "material", "one description per line", "Never name any other"):
        assert word in user
    more = build_prompt("forklift", 5, exclude=["A yellow forklift with two forks."])[1]["content"]
    assert more.startswith("Write 5 more short") and "- A yellow forklift with two forks." in more
    with pytest.raises(ValueError):
        build_prompt("forklift", 0)


def test_parse_descriptions_strips_markers_markdown_quotes_and_duplicates():
    text = """<think>I should list things. 1. Not this line at all</think>
Here are 5 descriptions of a forklift:

1. A yellow forklift with two steel forks.
2) **Bright orange** counterweight at the rear of the truck.
(3) "A small overhead guard protects the driver's seat."
- A yellow forklift with two steel forks!
* `Black solid rubber tyres` on small wheels
• Mast chains run along the *upright* steel rails.
4. Too short
5. a yellow  FORKLIFT with two steel forks
6. """ + " ".join(["word"] * 61) + """
```
I hope these help!
"""
    expected = [
        "A yellow forklift with two steel forks.",
        "Bright orange counterweight at the rear of the truck.",
        "A small overhead guard protects the driver's seat.",
        "Black solid rubber tyres on small wheels",
        "Mast chains run along the upright steel rails.",
    ]
    assert parse_descriptions(text, 20) == expected
    assert parse_descriptions(text, 2) == expected[:2]
    plain = "Sure! Here are some descriptions.\nA tall mast rises above the cab.\nThe forks are flat and long."
    assert parse_descriptions(plain, 10) == ["A tall mast rises above the cab.", "The forks are flat and long."]
    assert parse_descriptions("", 5) == []
    assert parse_descriptions("12.5 ton capacity is printed on the side", 5) == [
        "12.5 ton capacity is printed on the side"]


def test_chat_url_tolerates_trailing_slash_and_full_path():
    assert chat_url("http://h:1/v1") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_url("https://h/v1/chat/completions/") == "https://h/v1/chat/completions"
    for bad in ("ftp://h/v1", "localhost:11434/v1", "http:///v1", "http://user:pw@h/v1"):
        with pytest.raises(ValueError):
            chat_url(bad)


# --------------------------------------------------------------------------------------------------------------
# normal answers


def test_numbered_answer_gives_n_descriptions_in_knowledge_format(server, tmp_path):
    server.chat(numbered(sents("forklift", 20)))
    out = tmp_path / "kb.json"
    summary = describe(server, out_path=out, temperature=0.3, max_tokens=500)
    kb = read(out)
    assert kb == {"format": KNOWLEDGE_FORMAT,
                  "classes": {"forklift": {"descriptions": sents("forklift", 20), "synonyms": []}}}
    assert summary["knowledge"] == kb
    assert summary["classes"]["forklift"] == {"status": "complete", "descriptions": 20, "missing": 0,
                                              "requests": 1, "error": None}
    assert summary["complete"] == ["forklift"] and summary["short"] == summary["failed"] == []
    (req,) = server.requests
    assert req["method"] == "POST" and req["path"] == "/v1/chat/completions"
    assert set(req["json"]) == {"model", "messages", "temperature", "max_tokens"}
    assert req["json"]["model"] == "test-model"
    assert req["json"]["temperature"] == 0.3 and req["json"]["max_tokens"] == 500
    assert req["json"]["messages"] == build_prompt("forklift", 20)
    assert req["headers"]["content-type"] == "application/json"
    assert "authorization" not in req["headers"]


def test_endpoint_with_trailing_slash_or_full_path(server):
    server.chat(numbered(sents("a", 3))).chat(numbered(sents("b", 3)))
    describe(server, "a", n=3, endpoint=server.base + "/")
    describe(server, "b", n=3, endpoint=server.base + "/chat/completions")
    assert [r["path"] for r in server.requests] == ["/v1/chat/completions"] * 2


def test_bulleted_answer_with_preamble_and_duplicates_asks_for_the_missing(server):
    first = sents("forklift", 15)
    dupes = [first[0].upper(), first[1].rstrip(".") + "!", "  " + first[2].replace(" ", "   "),
             f'"{first[3]}"', first[4].lower()]
    server.chat("Here are 20 descriptions of a forklift:\n\n" + "\n".join(f"- {s}" for s in first + dupes)
                + "\n\nLet me know if you need more.")
    server.chat("\n".join(f"• {s}" for s in sents("forklift", 5, start=15)))
    summary = describe(server)
    descs = summary["knowledge"]["classes"]["forklift"]["descriptions"]
    assert descs == sents("forklift", 20)
    assert summary["classes"]["forklift"]["requests"] == 2
    assert len(server.requests) == 2
    second = server.prompts()[1]
    assert second.startswith('Write 5 more short, distinct, visual descriptions of "forklift"')
    assert f"- {first[0]}" in second  # known ones quoted so they are not repeated


def test_answer_cut_off_at_max_tokens_drops_last_line_and_tops_up(server):
    server.chat(numbered(sents("forklift", 20)), finish="length")
    server.chat(numbered(sents("forklift", 1, start=20)))
    summary = describe(server)
    descs = summary["knowledge"]["classes"]["forklift"]["descriptions"]
    assert descs == sents("forklift", 19) + sents("forklift", 1, start=20)
    assert server.prompts()[1].startswith("Write 1 more")


# --------------------------------------------------------------------------------------------------------------
# bad answers and retries


def test_malformed_json_is_a_failed_attempt(server, caplog):
    server.add('{"choices": [ not json', headers={"Content-Type": "application/json"})
    server.chat(numbered(sents("forklift", 20)))
    summary = describe(server)
    assert summary["classes"]["forklift"]["status"] == "complete"
    assert len(server.requests) == 2
    assert "not valid JSON" in caplog.text


def test_html_body_is_a_failed_attempt_that_mentions_v1(server):
    page = "<!DOCTYPE html><html><body>Open WebUI</body></html>"
    server.add(page, headers={"Content-Type": "text/html"}).add(page, headers={"Content-Type": "text/html"})
    summary = describe(server, retries=1)
    info = summary["classes"]["forklift"]
    assert info["status"] == "failed" and info["requests"] == 2
    assert "HTML" in info["error"] and "/v1" in info["error"]
    assert summary["failed"] == ["forklift"] and "forklift" not in summary["knowledge"]["classes"]


def test_json_without_choices_is_a_failed_attempt(server, caplog):
    server.add(json.dumps({"id": "x", "object": "chat.completion"}))
    server.add(json.dumps({"error": {"message": "model is loading"}}))
    server.chat(numbered(sents("forklift", 20)))
    summary = describe(server)
    assert summary["classes"]["forklift"]["requests"] == 3
    assert "choices[0].message.content" in caplog.text and "model is loading" in caplog.text


def test_429_is_retried_by_the_client_after_retry_after(server):
    server.add("slow down", status=429, headers={"Retry-After": "0.3"})
    server.chat(numbered(sents("forklift", 20)))
    sleeps = []
    summary = describe(server, backoff=20.0, sleep=sleeps.append)
    assert summary["classes"]["forklift"] == {"status": "complete", "descriptions": 20, "missing": 0,
                                              "requests": 2, "error": None}
    assert len(server.requests) == 2 and sleeps == []  # the openai client waited, not describe
    (gap,) = server.gaps()
    assert 0.3 <= gap < 5.0  # Retry-After, not the 20 s back-off


def test_retry_after_is_capped_at_60_seconds(server):
    """The client leaves a Retry-After over 60 s to describe, which waits 60 s (here a fake) and asks again."""
    server.add("slow down", status=429, headers={"Retry-After": "3600"})
    server.chat(numbered(sents("forklift", 20)))
    sleeps = []
    summary = describe(server, sleep=sleeps.append)
    assert sleeps == [60.0] and len(server.requests) == 2
    assert summary["classes"]["forklift"]["requests"] == 2


def test_5xx_retried_with_exponential_backoff(server):
    server.add("boom", status=500).add("bad gateway", status=502).add("", status=503)
    server.chat(numbered(sents("forklift", 20)))
    sleeps = []
    summary = describe(server, retries=3, backoff=0.1, sleep=sleeps.append)
    assert summary["classes"]["forklift"]["status"] == "complete"
    assert summary["classes"]["forklift"]["requests"] == 4 and len(server.requests) == 4
    assert sleeps == []  # the openai client waited between its retries
    gaps = server.gaps()
    for gap, wait in zip(gaps, (0.1, 0.2, 0.4)):
        assert wait <= gap < wait + 3.0
    assert gaps[2] > gaps[0]


def test_5xx_uses_up_the_retries_then_the_class_fails(server):
    for _ in range(3):
        server.add("busy", status=503)
    summary = describe(server, retries=2)
    info = summary["classes"]["forklift"]
    assert info["status"] == "failed" and info["requests"] == 3 and len(server.requests) == 3
    assert "HTTP 503" in info["error"]


def test_slow_response_times_out_then_succeeds(server):
    server.chat(numbered(sents("forklift", 20)), delay=0.5)
    server.chat(numbered(sents("forklift", 20)))
    summary = describe(server, timeout=0.2)
    assert summary["classes"]["forklift"]["status"] == "complete"
    assert len(server.requests) == 2  # the client gave up on the slow answer and asked again
    assert summary["classes"]["forklift"]["requests"] == 2


def test_slow_responses_only_end_with_unreachable(server):
    for _ in range(2):
        server.chat(numbered(sents("forklift", 20)), delay=0.4)
    with pytest.raises(EndpointUnreachable, match="within 0.15 s"):
        describe(server, timeout=0.15, retries=1)


def test_401_fails_at_once_and_never_leaks_the_key(server, tmp_path, monkeypatch, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, KEY)

    def echo(headers):  # a server that echoes the header back in its error
        return json.dumps({"error": {"message": f"invalid key; you sent {headers.get('Authorization')}"}})

    server.add(echo, status=401, headers={"Content-Type": "application/json"})
    out = tmp_path / "kb.json"
    code = main(["-vv", "describe", "--classes", "forklift,pallet", "--endpoint", server.base, "--model", "m",
                 "--out", str(out), "--api-key-env", KEY_ENV, "--retries", "5", "--backoff", "0.01"])
    captured = capsys.readouterr()
    assert code == 2
    assert len(server.requests) == 1  # no retry on 401
    assert server.requests[0]["headers"]["authorization"] == f"Bearer {KEY}"
    err_lines = captured.err.strip().splitlines()
    assert len(err_lines) == 1 and "401" in err_lines[0] and "invalid key" in err_lines[0]
    assert "API key" in err_lines[0]
    for text in (captured.out, captured.err, caplog.text):
        assert KEY not in text
    assert not out.exists()
    # the library error too
    server.add(echo, status=401)
    with pytest.raises(EndpointError) as info:
        describe(server, api_key=KEY)
    assert "401" in str(info.value) and KEY not in str(info.value) and "[redacted]" in str(info.value)


def test_404_hints_at_the_base_url(server):
    server.add('{"error": "model not found"}', status=404)
    with pytest.raises(EndpointError, match=r"404.*model not found.*/v1"):
        describe(server)
    assert len(server.requests) == 1


def test_redirect_is_not_followed(server):
    server.add("", status=307, headers={"Location": server.base + "/elsewhere/chat/completions"})
    with pytest.raises(EndpointError, match="redirected"):
        describe(server, api_key=KEY)
    assert len(server.requests) == 1


def test_endpoint_down_gives_one_line_naming_it(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/v1"
    code = cli(url, "--retries", "2", out=tmp_path / "kb.json")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and url in err[0] and "unreachable after 3 attempts" in err[0]
    assert not (tmp_path / "kb.json").exists()


def test_refused_connection_gives_up_at_once_with_a_clear_message(tmp_path, capsys):
    """No server: the client's retries do not wait (no 31 s of back-off), the error names the URL."""
    pytest.importorskip("openai")
    url = f"http://127.0.0.1:{free_port()}/v1"
    sleeps = []
    t0 = time.monotonic()
    with pytest.raises(EndpointUnreachable) as info:
        describe_classes("forklift", endpoint=url, model="m", n=20, retries=5, backoff=30.0, timeout=5.0,
                         sleep=sleeps.append)
    assert time.monotonic() - t0 < 5.0 and sleeps == []
    msg = str(info.value)
    assert "unreachable after 6 attempts" in msg and f"cannot connect to {url}/chat/completions" in msg
    assert len(msg.splitlines()) == 1
    # the CLI with its default back-off (1 s) and retries (5)
    t0 = time.monotonic()
    code = main(["describe", "--classes", "forklift", "--endpoint", url, "--model", "m",
                 "--out", str(tmp_path / "kb.json")])
    assert code == 2 and time.monotonic() - t0 < 5.0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot connect" in err[0] and url in err[0]


def test_short_after_all_retries_is_written_and_exits_1_then_topped_up(server, tmp_path, capsys, caplog):
    out = tmp_path / "kb.json"
    eight = numbered(sents("pallet", 8))
    for _ in range(3):
        server.chat(eight)  # the model keeps repeating the same 8
    code = cli(server, "--retries", "2", out=out, classes="pallet")
    captured = capsys.readouterr()
    assert code == 1
    assert len(server.requests) == 3
    assert all(p.startswith("Write 12 more") for p in server.prompts()[1:])
    assert read(out)["classes"]["pallet"]["descriptions"] == sents("pallet", 8)
    assert "pallet: only 8 of 20 descriptions (3 requests)" in captured.out
    assert "incomplete: pallet" in captured.err
    assert "pallet: 8 of 20 descriptions" in caplog.text  # the warning
    # a re-run asks only for the missing 12
    server.requests.clear()
    server.chat(numbered(sents("pallet", 12, start=8)))
    code = cli(server, out=out, classes="pallet")
    assert code == 0 and len(server.requests) == 1
    assert server.prompts()[0].startswith('Write 12 more short, distinct, visual descriptions of "pallet"')
    assert read(out)["classes"]["pallet"]["descriptions"] == sents("pallet", 20)
    assert "pallet: 20 descriptions (1 request)" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------
# resume, interruption, key handling, usage errors


def test_resume_asks_only_for_missing_classes(server, tmp_path, capsys):
    out = tmp_path / "kb.json"
    out.write_text(json.dumps({"format": KNOWLEDGE_FORMAT, "classes": {
        "forklift": {"descriptions": sents("forklift", 20), "synonyms": ["lift truck"]},
        "crate": {"descriptions": sents("crate", 3), "synonyms": []}}}))
    server.chat(numbered(sents("pallet", 20)))
    code = cli(server, out=out)
    assert code == 0
    assert len(server.requests) == 1 and '"pallet"' in server.prompts()[0]
    kb = read(out)
    assert kb["classes"]["forklift"] == {"descriptions": sents("forklift", 20), "synonyms": ["lift truck"]}
    assert kb["classes"]["pallet"]["descriptions"] == sents("pallet", 20)
    assert kb["classes"]["crate"]["descriptions"] == sents("crate", 3)  # not requested: kept as it was
    stdout = capsys.readouterr().out
    assert "forklift: 20 descriptions already in" in stdout and "pallet: 20 descriptions (1 request)" in stdout
    # --overwrite re-asks every requested class
    server.requests.clear()
    server.chat(numbered(sents("forklift new", 20))).chat(numbered(sents("pallet new", 20)))
    assert cli(server, "--overwrite", out=out) == 0
    assert len(server.requests) == 2
    assert read(out)["classes"]["forklift"]["descriptions"] == sents("forklift new", 20)


def test_reference_plain_format_accepted_for_resume_and_converted(server, tmp_path):
    out = tmp_path / "kb.json"
    out.write_text(json.dumps({"forklift": sents("forklift", 20), "pallet": sents("pallet", 5)}))
    server.chat(numbered(sents("pallet", 15, start=5)))
    summary = describe(server, "forklift,pallet", out_path=out)
    assert len(server.requests) == 1
    prompt = server.prompts()[0]
    assert prompt.startswith('Write 15 more short, distinct, visual descriptions of "pallet"')
    assert f"- {sents('pallet', 1)[0]}" in prompt
    assert summary["classes"]["forklift"]["status"] == "skipped"
    assert read(out) == {"format": KNOWLEDGE_FORMAT, "classes": {
        "forklift": {"descriptions": sents("forklift", 20), "synonyms": []},
        "pallet": {"descriptions": sents("pallet", 20), "synonyms": []}}}


def test_unreadable_existing_file_is_a_usage_error_and_left_alone(server, tmp_path, capsys):
    out = tmp_path / "kb.json"
    for content in ("{ not json", json.dumps({"format": "other/2", "classes": {}}), json.dumps(["a", "b"])):
        out.write_text(content)
        assert cli(server, out=out) == 2
        assert out.read_text() == content
        assert "kb.json" in capsys.readouterr().err
    assert server.requests == []


def test_hard_failure_on_second_class_keeps_the_first_on_disk(server, tmp_path):
    out = tmp_path / "kb.json"
    server.chat(numbered(sents("forklift", 20)))
    server.add('{"error": "model not found"}', status=404)
    with pytest.raises(EndpointError):
        describe(server, "forklift,pallet", out_path=out)
    kb = read(out)
    assert kb["format"] == KNOWLEDGE_FORMAT and list(kb["classes"]) == ["forklift"]
    assert kb["classes"]["forklift"]["descriptions"] == sents("forklift", 20)
    assert [p.name for p in tmp_path.iterdir()] == ["kb.json"]  # no temporary file left behind


def test_interrupt_during_second_class_keeps_the_first_on_disk(server, tmp_path):
    out = tmp_path / "kb.json"
    server.chat(numbered(sents("forklift", 20)))
    server.add("<html>busy</html>", headers={"Content-Type": "text/html"})  # describe waits, then asks again

    def interrupt(seconds):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        describe(server, "forklift,pallet", out_path=out, sleep=interrupt)
    assert list(read(out)["classes"]) == ["forklift"]


def test_authorization_header_only_when_env_var_is_set(server, tmp_path, monkeypatch, capsys):
    server.chat(numbered(sents("forklift", 20))).chat(numbered(sents("forklift", 20)))
    server.chat(numbered(sents("forklift", 20)))
    assert cli(server, out=tmp_path / "a.json", classes="forklift") == 0  # default OPENAI_API_KEY unset
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert cli(server, out=tmp_path / "b.json", classes="forklift") == 0
    monkeypatch.setenv(KEY_ENV, "other-key-42")
    assert cli(server, "--api-key-env", KEY_ENV, out=tmp_path / "c.json", classes="forklift") == 0
    auth = [r["headers"].get("authorization") for r in server.requests]
    assert auth == [None, f"Bearer {KEY}", "Bearer other-key-42"]
    captured = capsys.readouterr()
    assert KEY not in captured.out + captured.err and "other-key-42" not in captured.out + captured.err
    assert KEY not in (tmp_path / "b.json").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--endpoint", "ftp://127.0.0.1/v1"], "http://"),
    (["--endpoint", "localhost:11434/v1"], "http://"),
    (["--classes", ""], "empty class name"),
    (["--classes", "cat,Cat"], "duplicate"),
    (["--n", "0"], "--n"),
    (["--retries", "-1"], "--retries"),
    (["--timeout", "0"], "--timeout"),
    (["--api-key-env", "sk-abc-123"], "NAME of an environment variable"),
    (["--api-key-env", "NOT_SET_ANYWHERE_123"], "is not set"),
])
def test_usage_errors_exit_2(server, tmp_path, capsys, extra, message):
    args = ["describe", "--classes", "forklift", "--endpoint", server.base, "--model", "m",
            "--out", str(tmp_path / "kb.json"), *extra]  # later options win
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert "sk-abc-123" not in err
    assert server.requests == []


def test_out_is_a_directory_is_a_usage_error(server, tmp_path, capsys):
    assert cli(server, out=tmp_path) == 2
    assert "directory" in capsys.readouterr().err and server.requests == []


def test_library_validates_arguments(server):
    for kw in ({"n": 0}, {"retries": -1}, {"timeout": 0}, {"max_tokens": 0}, {"model": " "},
               {"endpoint": "file:///v1"}, {"api_key": "has space"}):
        with pytest.raises(ValueError):
            describe(server, **kw)
    assert server.requests == []


# --------------------------------------------------------------------------------------------------------------
# the optional openai dependency


def test_import_excelseg_and_the_cli_do_not_import_openai():
    code = ("import sys, excelseg, excelseg.describe; from excelseg.cli import main; "
            "main(['describe', '--help']); print('openai' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "False"


def test_missing_openai_is_a_one_line_error_naming_the_extra(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openai", None)  # "import openai" raises ImportError
    assert cli(server, out=tmp_path / "kb.json") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and INSTALL_HINT in err[0] and 'pip install "excelseg[describe]"' in err[0]
    with pytest.raises(DescribeError, match=r"excelseg\[describe\]"):
        describe(server)
    assert server.requests == [] and not (tmp_path / "kb.json").exists()
