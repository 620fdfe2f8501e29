"""The transport of ``excelseg describe``: chat completions through the official ``openai`` client.

``openai`` is an optional dependency (``pip install "excelseg[describe]"``), imported only when a
:class:`ChatClient` is made, never by ``import excelseg``. The client makes the HTTP requests, its retries
(``max_retries``) and timeouts; this module sets the wait between its retries (``backoff · 2^k`` or the server's
``Retry-After``, at most 60 s, none after a request that got no answer at all), refuses redirects, sends no
``Authorization`` header without a key, keeps the key out of every message, and checks each answer.
"""

from __future__ import annotations

import email.utils
import json
import logging
import urllib.parse
from datetime import datetime, timezone

from ._messages import one_line

__all__ = ["INSTALL_HINT", "ChatClient", "DescribeError", "EndpointError", "EndpointUnreachable", "FailedAttempt",
           "chat_url", "require_openai"]

_logger = logging.getLogger("excelseg.describe")

MAX_WAIT = 60.0  # seconds: cap of back-off and Retry-After
INSTALL_HINT = 'pip install "excelseg[describe]"'


class DescribeError(RuntimeError):
    """The run cannot go on; the message is one line and never contains the API key."""


class EndpointError(DescribeError):
    """The endpoint refused the request (4xx other than 408/409/429, or a redirect): retrying would not help."""


class EndpointUnreachable(DescribeError):
    """No HTTP answer at all (connection refused, DNS failure, timeouts) during all requests of a class."""


class FailedAttempt(Exception):
    """A request that may succeed when repeated."""

    def __init__(self, message: str, retry_after: float | None = None, transport: bool = False):
        super().__init__(message)
        self.retry_after = retry_after
        self.transport = transport


def require_openai():
    """The ``openai`` module, or :class:`DescribeError` naming the extra to install."""
    try:
        import openai
    except ImportError:
        raise DescribeError(f"excelseg describe needs the openai Python client: {INSTALL_HINT}") from None
    return openai


def chat_url(endpoint: str) -> str:
    """``<endpoint>/chat/completions`` for an ``http(s)://.../v1`` base URL; ``ValueError`` for a bad URL."""
    base = str(endpoint).strip()
    parts = urllib.parse.urlsplit(base)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"endpoint must be an http:// or https:// API base URL such as http://localhost:11434/v1, got {base!r}"
        )
    if parts.username or parts.password:
        raise ValueError("endpoint must not contain a user name or password; put the API key in the environment")
    base = base.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    return base + "/chat/completions"


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _client_class(openai) -> type:
    class _OpenAI(openai.OpenAI):
        """The openai client with our wait between its retries (it has no setting for the back-off)."""

        backoff = 1.0

        def _calculate_retry_timeout(self, remaining_retries, options, response_headers=None):
            if response_headers is None:  # no answer at all (refused, timed out): waiting would not help
                return 0.0
            wait = _retry_after(response_headers)
            if wait is None:
                done = max(0, options.get_max_retries(self.max_retries) - remaining_retries)
                wait = self.backoff * 2.0 ** min(done, 30)
            return min(MAX_WAIT, wait)

        def _should_retry(self, response) -> bool:
            wait = _retry_after(response.headers)
            if wait is not None and wait > MAX_WAIT:  # describe waits the capped time itself, then asks again
                return False
            return super()._should_retry(response)

    return _OpenAI


class ChatClient:
    """One chat completion at a time through the openai client; ``requests`` counts the HTTP requests sent."""

    def __init__(self, endpoint: str, model: str, api_key: str | None, timeout: float, temperature: float,
                 max_tokens: int, backoff: float):
        self.endpoint = str(endpoint).strip()
        self.url = chat_url(endpoint)
        self.model = model
        self._key = api_key or None
        self.timeout = timeout
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.requests = 0
        self._openai = openai = require_openai()

        def on_request(request) -> None:
            self.requests += 1
            if self._key is None:  # the client needs some key; none is sent
                request.headers.pop("Authorization", None)
            _logger.debug("POST %s (model %s)", self.url, self.model)

        http = openai.DefaultHttpxClient(follow_redirects=False, event_hooks={"request": [on_request]})
        self._client = _client_class(openai)(
            api_key=self._key or "no-key", base_url=self.url[: -len("/chat/completions")], timeout=timeout,
            max_retries=0, http_client=http)
        self._client.backoff = backoff

    def close(self) -> None:
        self._client.close()

    def redact(self, text: str) -> str:
        if self._key and self._key in text:
            text = text.replace(self._key, "[redacted]")
        return text

    def complete(self, messages: list[dict], max_retries: int) -> tuple[str, str | None]:
        """(content, finish_reason) of one chat completion, the client repeating failed requests up to
        ``max_retries`` times; raises FailedAttempt or EndpointError."""
        openai = self._openai
        self._client.max_retries = max_retries
        try:
            raw = self._client.chat.completions.with_raw_response.create(
                model=self.model, messages=messages, temperature=self.temperature, max_tokens=self.max_tokens)
        except openai.APITimeoutError:
            raise FailedAttempt(f"no answer from {self.url} within {self.timeout:g} s", transport=True) from None
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            why = self.redact(one_line(str(cause) or type(cause).__name__, 200))
            raise FailedAttempt(f"cannot connect to {self.url}: {why}", transport=True) from None
        except openai.APIStatusError as exc:
            self._refused(exc.response)
        except openai.OpenAIError as exc:
            raise DescribeError(f"openai client error: {self.redact(one_line(exc, 200))}") from None
        return self._content(raw.http_response)

    def _refused(self, response) -> None:
        status, headers = response.status_code, response.headers
        text = self.redact(response.text)
        _logger.debug("%s answered HTTP %d, %d bytes", self.url, status, len(response.content))
        if status in (408, 409, 429) or status >= 500:
            raise FailedAttempt(f"{self.url} answered HTTP {status}: {one_line(text, 200)}",
                                 retry_after=_retry_after(headers))
        if 300 <= status < 400:
            where = headers.get("Location", "?")
            raise EndpointError(f"{self.url} redirected (HTTP {status}) to {self.redact(where)}; "
                                f"give the final API base URL (…/v1) as the endpoint")
        hint = ""
        if status in (401, 403):
            hint = " (is the API key right?)"
        elif status in (404, 405):
            hint = f" (is the endpoint the API base URL ending in /v1, and does model {self.model!r} exist?)"
        raise EndpointError(f"{self.url} answered HTTP {status}: {one_line(text, 200)}{hint}")

    def _content(self, response) -> tuple[str, str | None]:
        text = self.redact(response.text)
        _logger.debug("%s answered HTTP %d, %d bytes", self.url, response.status_code, len(response.content))
        if "html" in response.headers.get("Content-Type", "").lower() or text.lstrip()[:1] == "<":
            raise FailedAttempt(f"{self.url} returned HTML, not JSON: is the endpoint the API base URL (…/v1)?")
        try:
            obj = json.loads(text)
        except ValueError:
            raise FailedAttempt(f"{self.url} returned a body that is not valid JSON: {one_line(text, 80)!r}") \
                from None
        try:
            choice = obj["choices"][0]
            content = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            content, choice = None, None
        if not isinstance(content, str):
            err = obj.get("error") if isinstance(obj, dict) else None
            if isinstance(err, dict):
                err = err.get("message", err)
            detail = f": error {one_line(str(err), 200)}" if err else ""
            raise FailedAttempt(f"{self.url} returned JSON without choices[0].message.content{detail}")
        return content, choice.get("finish_reason") if isinstance(choice, dict) else None
