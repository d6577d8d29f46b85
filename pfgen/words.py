"""English for messages and tables: one place for plurals ("1 head", "2 heads")."""

from __future__ import annotations


def count(n: int, noun: str) -> str:
    """`n` and `noun`, plural unless n is 1: count(1, "head") -> "1 head", count(12, "layer") -> "12 layers"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
