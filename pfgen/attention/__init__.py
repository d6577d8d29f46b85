"""Ragged-cache attention: one interface, several backends, each tested against the fp64 oracle.

A backend is a callable (rule_plan, store, q_raw, q_abs) -> (B, F*N, n, D), where q_raw holds the chunk's
queries before RoPE and q_abs the same rotated at their own positions. `get_backend` builds one and the
pipeline hands it to `KVCache` (cache/ never imports attention/).
"""

from __future__ import annotations

import functools

import torch

from pfgen.attention.sdpa import attend_reference
from pfgen.attention.split import attend_split
from pfgen.config import BACKENDS  # the names config.validate accepts: auto, split, sdpa, triton


def triton_available() -> bool:
    """The Triton kernel compiles for CUDA devices, or runs anywhere under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def get_backend(name: str, device, theta: float = 10000.0):
    """`auto` is `split` (in-place reads, two-part log-sum-exp merge) until the `triton` kernel has been
    timed on a GPU (docs/benchmarks.md); `theta` is the RoPE base the store's keys were rotated with."""
    if name == "auto":
        name = "split"
    if name == "split":
        return attend_split
    if name == "sdpa":
        return functools.partial(attend_reference, theta=theta)
    if name == "triton":
        if not triton_available():
            raise ValueError("the triton attention backend needs the triton package (pip install triton)")
        if torch.device(device).type != "cuda" and not _interpreted():
            raise ValueError("the triton attention backend runs on CUDA devices (or under TRITON_INTERPRET=1)")
        from pfgen.attention.ragged import attend_ragged

        return attend_ragged
    raise ValueError(f"unknown attention backend '{name}'; choose from {', '.join(BACKENDS)}")


def _interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"
