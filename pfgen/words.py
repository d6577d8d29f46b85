"""English for messages and tables: one place for plurals ("1 head", "2 heads"), byte sizes and long texts."""

from __future__ import annotations


def count(n: int, noun: str) -> str:
    """`n` and `noun`, plural unless n is 1: count(1, "head") -> "1 head", count(12, "layer") -> "12 layers"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def format_bytes(n: float) -> str:
    """1536 -> "1.5 KiB"; GiB is the largest unit."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def shorten(text: str, limit: int = 60) -> str:
    """A prompt as status lines quote it: whole up to `limit` characters, else its start, '...' and its length
    (metadata, manifests and states keep the whole text)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit - 3]!r}... ({len(text):,} characters)"


def quote(value, limit: int = 60) -> str:
    """Any value as an error line quotes it: a text as `shorten` does, anything else by its repr, cut the same way
    (a 10k-character prompt in a bad timeline entry must not make a 10k-character error line)."""
    if isinstance(value, str):
        return shorten(value, limit)
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}... ({len(text):,} characters)"
