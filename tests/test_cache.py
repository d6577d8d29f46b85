"""The cache engine against a literal reading of docs/design.md section 2 (tests/spec.py)."""

import dataclasses
import os

import pytest
import torch

from pfgen.attention import get_backend
from pfgen.attention.split import attention_lse, attention_lse_math, merge_parts
from pfgen.cache.engine import CacheGeometry, KVCache
from pfgen.cache.policy import make_rule
from pfgen.config import CacheConfig, PyramidConfig
from pfgen.rope import frame_table
from spec import key_items, oracle_attention, rotate_frame

KINDS = ("anchor", "wave", "veil", "rolling", "full")
DEVICE = os.environ.get("PFGEN_TEST_DEVICE", "cpu")  # `cuda` runs the engine checks on a GPU


def spec_params(kind, cfg: CacheConfig):
    p = cfg.pyramid
    if kind == "rolling":
        return dataclasses.asdict(cfg.rolling)
    if kind == "full":
        return {}
    return {**dataclasses.asdict(getattr(p, kind)), "recent": p.recent, "rope_window": p.rope_window}


def policy_items(read):
    out = []
    for seg in read.segments:
        if seg.kind == "merge":
            out += [(seg.kind, ("block", m), r) for m, r in zip(seg.blocks, seg.rope_t)]
        else:
            out += [(seg.kind, ("frame", t), r) for t, r in zip(seg.frames, seg.rope_t)]
    return sorted(out)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("frames_per_chunk", [3, 1])
def test_plan_equals_brute_force(kind, frames_per_chunk):
    """Block 0, warm-up, a merge block overlapping recent (t=24), steady state at t=100 and t=239."""
    cfg = CacheConfig()
    rule = make_rule(kind, cfg, frames_per_chunk, max_frames=240)
    checked = {0, 4, 14, 24, 27, 100, 239}
    for t0 in range(0, 240, frames_per_chunk):
        rule.begin_chunk(t0, frames_per_chunk)
        reads = rule.reads(t0, frames_per_chunk)
        for f, read in enumerate(reads):
            if t0 + f in checked or kind != "full":
                expected = sorted(key_items(kind, spec_params(kind, cfg), t0, frames_per_chunk, t0 + f))
                assert policy_items(read) == expected, (kind, t0 + f)
        rule.commit(t0, frames_per_chunk)


def test_steady_state_budgets():
    """docs/design.md section 2 budgets at 1560 tokens/frame: wave 9 frames, anchor 11, veil 7 + 4 (or 3) merged
    blocks."""
    cfg = CacheConfig()
    sizes = {}
    for kind in ("wave", "anchor", "veil"):
        rule = make_rule(kind, cfg, 3, 0)
        for t0 in range(0, 30, 3):
            rule.begin_chunk(t0, 3)
            reads = rule.reads(t0, 3)
            rule.commit(t0, 3)
        sizes[kind] = [(len(r.abs_slots) + len(r.hist_slots)) for r in reads]
    assert sizes == {"wave": [9, 9, 9], "anchor": [11, 11, 11], "veil": [11, 11, 11]}


def run_engine(cfg, types, grid, chunks, frames_per_chunk, backend, seed=0, heads_dim=32, dtype=torch.float32):
    """Drive a 1-layer cache with random q/k/v: 2 noisy passes and a clean pass per chunk.

    Returns (outputs, expected) per pass, expected from the spec oracle with clean K/V for history."""
    g = torch.Generator().manual_seed(seed)
    heads = len(types[0])
    n = grid[0] * grid[1]
    geometry = CacheGeometry(1, heads, heads_dim, grid, 1, chunks * frames_per_chunk)
    cache = KVCache(cfg, types, geometry, frames_per_chunk, dtype, DEVICE,
                    get_backend(backend, DEVICE, geometry.theta))
    committed = {}
    results = []
    for c in range(chunks):
        t0 = c * frames_per_chunk
        cache.begin_chunk(t0, frames_per_chunk)
        rope = frame_table(range(t0, t0 + frames_per_chunk), *grid, heads_dim, device=DEVICE)
        for p in range(3):
            q, k, v = (torch.randn(1, frames_per_chunk * n, heads, heads_dim, generator=g) for _ in range(3))
            cache.set_pass(commit=p == 2)
            out = cache.attend(0, *(x.to(DEVICE, dtype) for x in (q, k, v)), rope).cpu()
            frame_kv = dict(committed)
            for f in range(frames_per_chunk):
                frame_kv[t0 + f] = (k[0, f * n:(f + 1) * n], v[0, f * n:(f + 1) * n])
            results.append((t0, q, out, frame_kv))
            if p == 2:
                committed = frame_kv
    return cache, results


def expected_output(cfg, types, grid, t0, frames_per_chunk, q, frame_kv, head_dim=32):
    n = grid[0] * grid[1]
    out = torch.empty(frames_per_chunk * n, len(types[0]), head_dim, dtype=torch.float64)
    for h, kind in enumerate(types[0]):
        for f in range(frames_per_chunk):
            items = key_items(kind, spec_params(kind, cfg), t0, frames_per_chunk, t0 + f)
            qf = rotate_frame(q[0, f * n:(f + 1) * n, h:h + 1], t0 + f, grid, head_dim)
            kv = {t: (k[:, h:h + 1], v[:, h:h + 1]) for t, (k, v) in frame_kv.items()}
            p = cfg.pyramid.veil
            o = oracle_attention(qf, kv, items, grid, head_dim, patch=p.patch, block=p.block)
            out[f * n:(f + 1) * n, h] = o[:, 0]
    return out


@pytest.mark.parametrize("backend", ["sdpa", "split"])
@pytest.mark.parametrize("frames_per_chunk", [3, 1])
def test_engine_equals_oracle(backend, frames_per_chunk):
    """Every head type, every pass, every chunk (history past the window), odd grid with partial patches."""
    cfg = CacheConfig(rolling=dataclasses.replace(CacheConfig().rolling, window=9, sink=2),
                      pyramid=PyramidConfig(rope_window=7))
    types = [["wave", "anchor", "veil", "rolling", "full", "wave"]]
    grid = (3, 5)
    chunks = 42 // frames_per_chunk
    _, results = run_engine(cfg, types, grid, chunks, frames_per_chunk, backend)
    for t0, q, out, frame_kv in results:
        want = expected_output(cfg, types, grid, t0, frames_per_chunk, q, frame_kv)
        torch.testing.assert_close(out[0].double(), want, atol=2e-5, rtol=1e-5, msg=f"t0={t0}")


def test_noisy_passes_leave_history_unchanged():
    cfg = CacheConfig()
    types = [["wave", "anchor", "veil"]]
    cache, _ = run_engine(cfg, types, (2, 2), 12, 3, "split")
    snap = {k: [t.clone() for t in (s.k_hist, s.v_hist, s.acc_k, s.acc_v) if t is not None]
            for k, s in cache.stores[0].items()}
    cache.begin_chunk(36, 3)
    cache.set_pass(commit=False)
    q = torch.randn(1, 12, 3, 32)
    rope = frame_table(range(36, 39), 2, 2, 32)
    for _ in range(4):
        cache.attend(0, q, torch.randn_like(q), torch.randn_like(q), rope)
    for kind, store in cache.stores[0].items():
        now = [t for t in (store.k_hist, store.v_hist, store.acc_k, store.acc_v) if t is not None]
        for before, after in zip(snap[kind], now):
            assert torch.equal(before, after), kind


def test_merged_blocks_are_exact_means():
    cfg = CacheConfig()
    grid = (3, 5)
    cache, results = run_engine(cfg, [["veil"]], grid, 8, 3, "split")
    store = cache.stores[0]["veil"]
    committed = results[-1][3]
    rule = cache.rules["veil"]
    for i, m in enumerate(rule.merged.items):
        v = torch.stack([committed[t][1] for t in range(4 * m, 4 * m + 4)]).double().mean(0)  # (N, 1, D)
        grid_v = v.reshape(3, 5, -1)
        a, b = store.abs_range(rule.merged.first + i)
        stored = store.v_abs[0, a:b, 0].double().reshape(2, 3, -1)
        torch.testing.assert_close(stored[0, 0], grid_v[0:2, 0:2].mean((0, 1)))
        torch.testing.assert_close(stored[1, 2], grid_v[2:3, 4:5].mean((0, 1)))  # partial corner patch


def test_unlimited_budgets_equal_full():
    big = PyramidConfig(recent=10_000)
    cfg = CacheConfig(pyramid=big)
    types = [["wave", "anchor", "veil"]]
    _, pyramid = run_engine(cfg, types, (2, 3), 10, 3, "split", seed=3)
    _, full = run_engine(cfg, [["full"] * 3], (2, 3), 10, 3, "split", seed=3)
    for (_, _, a, _), (_, _, b, _) in zip(pyramid, full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_cache_memory_is_flat():
    cfg = CacheConfig()
    cache, _ = run_engine(cfg, [["wave", "anchor", "veil", "rolling"]], (2, 2), 40, 3, "split")
    bytes_after_40 = cache.nbytes()
    fresh = KVCache(cfg, [["wave", "anchor", "veil", "rolling"]], CacheGeometry(1, 4, 32, (2, 2)), 3,
                    torch.float32, "cpu", get_backend("split", "cpu"))
    assert bytes_after_40 == fresh.nbytes()
    assert all(len(f.items) <= 4 for f in cache.rules["wave"].fifos)
    assert len(cache.rules["veil"].merged.items) <= 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_lse_matches_math(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 64, generator=g).to(DEVICE, dtype) for n in (50, 70, 70))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    out, lse = attention_lse(q, k, v)
    ref, ref_lse = attention_lse_math(q, k, v)
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)
    # Two parts merged by their log-sum-exp equal attention over the union.
    o1, l1 = attention_lse(q, k[:, :30], v[:, :30])
    o2, l2 = attention_lse(q, k[:, 30:], v[:, 30:])
    torch.testing.assert_close(merge_parts(o1, l1, o2, l2).float(), out.float(), **tol)
