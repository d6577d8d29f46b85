"""Fast backend: read the store in place and merge two attention parts by their log-sum-exp.

Keys at own positions (region abs) and history keys (region hist, rotated at temporal 0) need different
query rotations, so each group runs two attention calls on free views of the store, one with queries at
t_q and one with queries at min(t_q, window), and combines them exactly through their log-sum-exp. No key is
copied or re-rotated on the steady-state path; all query frames of a head type share the calls.
"""

from __future__ import annotations

import torch

from pfgen.cache.plan import Group, RulePlan
from pfgen.attention.sdpa import sdpa
from pfgen.cache.store import RuleStore
from pfgen.rope import apply_rope


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention on (B, L, heads, D) that also returns the log-sum-exp of the scores, (B, L, heads) fp32."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True)[:2]
        lse = lse.squeeze(-1)
    elif q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True)[:2]
        lse = lse[..., : q.shape[1]]
    elif q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt)
    else:
        return attention_lse_math(q, k, v)
    return out.transpose(1, 2), lse.transpose(1, 2)


def attention_lse_math(q, k, v):
    """Plain-math attention with log-sum-exp, for devices without a fused kernel (and for tests)."""
    scores = torch.einsum("blhd,bmhd->bhlm", q.float(), k.float()) / q.shape[-1] ** 0.5
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhlm,bmhd->blhd", torch.softmax(scores, dim=-1), v.float())
    return out.to(q.dtype), lse.transpose(1, 2)


def merge_parts(o1, lse1, o2, lse2) -> torch.Tensor:
    """Exact softmax over the union of two key sets, from each part's output and log-sum-exp: part 2 has
    weight exp(lse2) / (exp(lse1) + exp(lse2)) = sigmoid(lse2 - lse1). Two full-size kernels; the weight is
    rounded to the output dtype (in bfloat16 that is below the output's own rounding)."""
    weight = torch.sigmoid(lse2 - lse1).unsqueeze(-1).to(o1.dtype)
    return torch.addcmul(o1, o2 - o1, weight)


def _hist_part(g: Group, store: RuleStore, q_raw: torch.Tensor, n: int):
    tokens = slice(g.first * n, g.stop * n)
    q = apply_rope(q_raw[:, tokens], g.hist.q_table)
    k = store.k_hist[g.hist.partitions][:, :, g.hist.keys]
    v = store.v_hist[g.hist.partitions][:, :, g.hist.keys]
    if not g.hist.per_frame:
        return attention_lse(q, k[0], v[0])
    frames = g.stop - g.first
    q = q.unflatten(1, (frames, n)).transpose(0, 1).flatten(0, 1)  # (F_g * B, N, n, D)
    o, lse = attention_lse(q, k.flatten(0, 1), v.flatten(0, 1))
    o = o.unflatten(0, (frames, -1)).transpose(0, 1).flatten(1, 2)
    lse = lse.unflatten(0, (frames, -1)).transpose(0, 1).flatten(1, 2)
    return o, lse


def attend_split(rp: RulePlan, store: RuleStore, q_raw, q_abs) -> torch.Tensor:
    n = store.frame_tokens
    outs = []
    for g in rp.groups:
        q = q_abs[:, g.first * n:g.stop * n]
        k, v = store.k_abs[:, g.abs_keys], store.v_abs[:, g.abs_keys]
        if g.hist is None:
            outs.append(sdpa(q, k, v))
            continue
        o1, lse1 = attention_lse(q, k, v)
        o2, lse2 = _hist_part(g, store, q_raw, n)
        outs.append(merge_parts(o1, lse1, o2, lse2))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
