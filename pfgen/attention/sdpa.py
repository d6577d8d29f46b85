"""Reference backend: spell out every query frame's key list at the positions docs/design.md section 2 gives,
then torch SDPA.

Slow on purpose only where it must be: it copies and re-rotates history keys for each query frame, and groups
query frames of equal key length into one batched call. Faster backends are checked against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pfgen.cache.plan import RulePlan, selection
from pfgen.cache.store import RuleStore
from pfgen.rope import apply_rope, temporal_table


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention on the model's (B, L, heads, D) layout."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def frame_keys(read, store: RuleStore, head_dim: int, theta: float):
    """K/V (B, L, n, D) that one query frame reads: abs keys as stored, hist keys shifted to sigma(t_q)."""
    sel = selection(read.abs_slots, store.abs_offsets, store.k_abs.device)
    ks, vs = [store.k_abs[:, sel]], [store.v_abs[:, sel]]
    if read.hist_slots:
        offsets = [i * store.frame_tokens for i in range(store.layout.hist_slots + 1)]
        hsel = selection(read.hist_slots, offsets, store.k_abs.device)
        kh = store.k_hist[read.hist_partition][:, hsel]
        table = temporal_table([read.hist_shift], kh.shape[1], head_dim, theta, kh.device)
        ks.append(apply_rope(kh, table))
        vs.append(store.v_hist[read.hist_partition][:, hsel])
    return torch.cat(ks, dim=1), torch.cat(vs, dim=1)


def attend_reference(rp: RulePlan, store: RuleStore, q_raw, q_abs, *, theta: float) -> torch.Tensor:
    """The backend interface plus `theta`, bound by `get_backend` (only this backend rotates keys)."""
    n = store.frame_tokens
    head_dim = q_abs.shape[-1]
    by_length: dict[int, list] = {}
    for f, read in enumerate(rp.reads):
        k, v = frame_keys(read, store, head_dim, theta)
        by_length.setdefault(k.shape[1], []).append((f, k, v))
    out = torch.empty_like(q_abs)
    for items in by_length.values():
        q = torch.cat([q_abs[:, f * n:(f + 1) * n] for f, _, _ in items])
        k = torch.cat([k for _, k, _ in items])
        v = torch.cat([v for _, _, v in items])
        o = sdpa(q, k, v).unflatten(0, (len(items), -1))
        for i, (f, _, _) in enumerate(items):
            out[:, f * n:(f + 1) * n] = o[i]
    return out
