"""Faster attention backends against the fp64 oracle: the Triton kernel (under TRITON_INTERPRET=1 on a CPU,
compiled with PFGEN_TEST_DEVICE=cuda), every head type, chunks of 3 and 1 frames, warm-up and steady state."""

import dataclasses
import os

import pytest
import torch

from pfgen.attention import get_backend, triton_available
from pfgen.config import CacheConfig, PyramidConfig
from test_cache import DEVICE, expected_output, run_engine

if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel module is imported (lazily, by get_backend)

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install triton)")
TYPES = [["wave", "wave", "anchor", "veil", "rolling"]]


@needs_triton
@pytest.mark.parametrize("frames_per_chunk", [3, 1])
def test_triton_equals_oracle(frames_per_chunk):
    """Warm-up (first chunks, index reads) through steady state (t >= 27, history past the RoPE window),
    every pass; a 3x5 grid so that merged blocks have partial patches and key runs partial blocks."""
    cfg = CacheConfig(rolling=dataclasses.replace(CacheConfig().rolling, window=9, sink=2),
                      pyramid=PyramidConfig(rope_window=7))
    grid, head_dim = (3, 5), 16
    chunks = 30 // frames_per_chunk
    _, results = run_engine(cfg, TYPES, grid, chunks, frames_per_chunk, "triton", heads_dim=head_dim)
    for t0, q, out, frame_kv in results:
        want = expected_output(cfg, TYPES, grid, t0, frames_per_chunk, q, frame_kv, head_dim=head_dim)
        torch.testing.assert_close(out[0].double(), want, atol=2e-5, rtol=1e-5, msg=f"t0={t0}")


@needs_triton
def test_triton_half_precision_equals_oracle():
    """Half-precision store and queries (bf16 on a GPU; fp16 in the interpreter, which misreads bf16): the
    kernel's fp32 online softmax stays within half-precision rounding of the fp64 oracle."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    cfg, types, grid = CacheConfig(), [["wave", "anchor", "veil"]], (2, 4)
    _, results = run_engine(cfg, types, grid, 10, 3, "triton", heads_dim=16, dtype=dtype)
    for t0, q, out, frame_kv in results[-6:]:  # steady state: t0 = 24, 27
        want = expected_output(cfg, types, grid, t0, 3, q, frame_kv, head_dim=16)
        torch.testing.assert_close(out[0].double(), want, atol=3e-2, rtol=3e-2, msg=f"t0={t0}")


def test_unknown_and_unavailable_backends_are_refused():
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_backend("flash", "cpu")
    if DEVICE == "cpu":
        os.environ.pop("TRITON_INTERPRET")
        try:
            with pytest.raises(ValueError, match="CUDA"):
                get_backend("triton", "cpu")
        finally:
            os.environ["TRITON_INTERPRET"] = "1"
