"""What every one-line error message shares: the first words of the library error behind it."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 200, empty: str = "") -> str:
    """The first line of ``exc``'s message, at most ``limit`` characters (``empty`` when it has none).

    Library errors run to many lines (HTTP bodies, torch's notes, tracebacks of workers); a crnn-art
    error keeps one line, so it quotes only the first.
    """
    return (str(exc).strip().splitlines() or [empty])[0][:limit]
