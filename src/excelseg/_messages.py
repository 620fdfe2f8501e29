"""Messages for people: an exception or a text on one line (errors per image, per file, per request)."""

from __future__ import annotations

__all__ = ["one_line"]


def one_line(exc: BaseException | str, limit: int | None = None) -> str:
    """An exception (``Type: message``) or a text on one line, whitespace collapsed, cut to ``limit`` chars."""
    if isinstance(exc, BaseException):
        text = " ".join(str(exc).split())
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    else:
        text = " ".join(str(exc).split())
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"
