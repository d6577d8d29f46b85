"""English for messages and tables: one place for plurals ("1 head", "2 heads") and byte sizes."""

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
