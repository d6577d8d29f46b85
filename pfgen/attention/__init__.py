"""Ragged-cache attention: one interface, several backends, each tested against the `sdpa` reference.

A backend is a callable (rule_plan, store, q_raw, q_abs, chunk_plan, theta) -> (B, F*N, n, D), where
q_raw holds the chunk's queries before RoPE and q_abs the same rotated at their own positions.
"""

from __future__ import annotations

from pfgen.attention.sdpa import attend_reference
from pfgen.attention.split import attend_split

BACKENDS = {"sdpa": attend_reference, "split": attend_split}


def get_backend(name: str):
    """`auto` picks the fastest backend available (split: in-place reads, two-part log-sum-exp merge)."""
    if name == "auto":
        name = "split"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend '{name}'; choose from auto, {', '.join(BACKENDS)}")
    return BACKENDS[name]
