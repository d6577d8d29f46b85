"""Triton backend: one kernel launch per head type walks each query frame's key segments.

The chunk's plan lists, per query frame, runs of stored tokens (`RulePlan.segments`): runs of region abs are
read with the queries at t_q, runs of region hist (one partition per frame) with the queries at
min(t_q, window). The kernel keeps one online softmax across all runs of a frame, so there is no second call
and no log-sum-exp merge; all query frames and all heads of the type share one grid, and the store is read
in place. It compiles for CUDA; under TRITON_INTERPRET=1 the same kernel runs on the CPU (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pfgen.cache.plan import ABS, RulePlan
from pfgen.cache.store import RuleStore
from pfgen.rope import apply_rope

LOG2E = 1.4426950408889634
REGION_ABS = tl.constexpr(ABS)  # the plan's region code, as a compile-time constant of the kernel


@triton.jit
def _walk(q, k_ptr, v_ptr, stride_t, first, count, m_i, l_i, acc, d, d_mask,
          qk_scale, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax update of (m_i, l_i, acc) with `count` keys from token `first` on (scores in log2)."""
    for n0 in range(0, count, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < count
        offs = (first + cols)[:, None] * stride_t + d[None, :]
        kv_mask = col_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + offs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(col_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _ragged_kernel(q_abs, q_hist, k_abs, v_abs, k_hist, v_hist, out, segments,
                   sq_b, sq_l, sq_h, sr_b, sr_l, sr_h, sa_b, sa_t, sa_h, sh_p, sh_b, sh_t, sh_h, so_b, so_l, so_h,
                   heads, frame_tokens, num_segments, head_dim, qk_scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    blocks_per_frame = tl.cdiv(frame_tokens, BLOCK_M)
    pid = tl.program_id(0)
    frame = pid // blocks_per_frame
    rows = (pid % blocks_per_frame) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < frame_tokens
    tokens = frame * frame_tokens + rows
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    q_mask = row_mask[:, None] & d_mask[None, :]
    qa = tl.load(q_abs + b * sq_b + tokens[:, None] * sq_l + h * sq_h + d[None, :], mask=q_mask, other=0.0)
    qh = tl.load(q_hist + b * sr_b + tokens[:, None] * sr_l + h * sr_h + d[None, :], mask=q_mask, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for i in range(num_segments):
        row = segments + (frame * num_segments + i) * 4
        region = tl.load(row)
        partition = tl.load(row + 1)
        first = tl.load(row + 2)
        count = tl.load(row + 3)
        if region == REGION_ABS:
            base = b * sa_b + h * sa_h
            m_i, l_i, acc = _walk(qa, k_abs + base, v_abs + base, sa_t, first, count, m_i, l_i, acc, d, d_mask,
                                  qk_scale, BLOCK_N, PRECISION)
        else:
            base = partition * sh_p + b * sh_b + h * sh_h
            m_i, l_i, acc = _walk(qh, k_hist + base, v_hist + base, sh_t, first, count, m_i, l_i, acc, d, d_mask,
                                  qk_scale, BLOCK_N, PRECISION)
    o = acc / l_i[:, None]
    tl.store(out + b * so_b + tokens[:, None] * so_l + h * so_h + d[None, :], o.to(out.dtype.element_ty), mask=q_mask)


def _blocks(device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): when interpreted, 16 query rows (partial blocks on the test
    grids) and 64 keys (several blocks per key set, the last one partial); FlashAttention-2-like tiles on a GPU
    (untuned, docs/benchmarks.md)."""
    if device.type != "cuda":
        return 16, 64, 1, 1
    return 64, 64, 4, 3


def attend_ragged(rp: RulePlan, store: RuleStore, q_raw: torch.Tensor, q_abs: torch.Tensor) -> torch.Tensor:
    """The backend interface: (B, F*N, n, D) attention of the chunk's queries over the type's store."""
    batch, length, heads, head_dim = q_abs.shape
    n = store.frame_tokens
    q_hist = apply_rope(q_raw, rp.hist_table) if rp.hist_table is not None else q_abs
    k_hist = store.k_hist if store.k_hist is not None else store.k_abs[None]
    v_hist = store.v_hist if store.v_hist is not None else store.v_abs[None]
    out = torch.empty((batch, length, heads, head_dim), dtype=q_abs.dtype, device=q_abs.device)
    block_m, block_n, warps, stages = _blocks(q_abs.device)
    frames, num_segments = rp.segments.shape[:2]
    grid = (frames * triton.cdiv(n, block_m), batch * heads)
    precision = "ieee" if q_abs.dtype == torch.float32 else "tf32"
    _ragged_kernel[grid](  # k and v of a store share one layout: the kernel takes the strides of k
        q_abs, q_hist, store.k_abs, store.v_abs, k_hist, v_hist, out, rp.segments,
        *_bth(q_abs), *_bth(q_hist), *_bth(store.k_abs), k_hist.stride(0), *_bth(k_hist[0]), *_bth(out),
        heads, n, num_segments, head_dim, LOG2E / head_dim ** 0.5,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        PRECISION=precision, num_warps=warps, num_stages=stages)
    return out


def _bth(x: torch.Tensor) -> tuple[int, int, int]:
    """Strides of batch, token and head of a (B, L, n, D) tensor whose channels are contiguous."""
    if x.stride(-1) != 1:
        raise ValueError("the triton backend needs contiguous channels")
    return x.stride(0), x.stride(1), x.stride(2)

