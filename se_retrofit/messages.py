"""Pieces of error messages shared across modules: a failure in one line, a long list cut short.

Errors here end up in one-line reasons (``find_sites``' skipped additions, the coverage table) and in
exceptions that wrap another; both must survive exceptions without a message and lists of thousands.
"""
from __future__ import annotations

from collections.abc import Sequence


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """``"TypeError: first line of the message"``: the type always, since some exceptions carry no text,
    and the first line with text, since some messages start with a newline."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def few(items: Sequence[str], n: int = 5) -> str:
    """The first ``n`` items and how many there are in all, for messages about long key lists."""
    shown = ", ".join(items[:n])
    return f"{shown}, ... ({len(items)} in all)" if len(items) > n else shown
