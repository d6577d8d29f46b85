"""An independent, literal reading of docs/design.md section 2 for the tests: sets in, key lists out.

Nothing here is shared with pfgen.cache: the tests compare pfgen's plans and attention outputs to it.
"""

from __future__ import annotations

import math

import torch

from pfgen.rope import rope_table


def key_items(kind: str, p: dict, t0: int, frames: int, t_q: int):
    """[(segment kind, ("frame", t) | ("block", m), rope_t)] that query frame t_q of chunk t0 attends to."""
    current_end = t0 + frames
    committed = set(range(t0))
    if kind == "full":
        return [("recent", ("frame", t), t) for t in range(current_end)]
    if kind == "rolling":
        sink = [t for t in range(min(p["sink"], current_end))]
        window = [t for t in range(max(p["sink"], current_end - (p["window"] - p["sink"])), current_end)]
        return [("sink" if t < t0 else "recent", ("frame", t), t) for t in sink] + [
            ("recent", ("frame", t), t) for t in window]
    recent = set(range(max(0, current_end - p["recent"]), current_end))
    sigma = max(0, t_q - p["rope_window"])
    sink = sorted(set(range(p["sink"])) & committed - recent)
    items = [("sink", ("frame", t), sigma) for t in sink]
    if kind == "anchor":
        strided = sorted(t for t in committed if t >= p["sink"] and t % p["stride"] == 0)[-p["capacity"]:]
        items += [("stride", ("frame", t), sigma) for t in strided if t not in recent]
    elif kind == "wave":
        phase = sorted(t for t in committed if t >= p["sink"] and t % p["period"] == t_q % p["period"])
        items += [("cyclic", ("frame", t), sigma) for t in phase[-p["capacity"]:] if t not in recent]
    elif kind == "veil":
        b = p["block"]
        done = [m for m in range(t0 // b + 1) if m * b >= p["sink"] and set(range(m * b, m * b + b)) <= committed]
        for m in done[-p["capacity"]:]:
            if not recent & set(range(m * b, m * b + b)):
                items.append(("merge", ("block", m), m * b + 1))
    items += [("recent", ("frame", t), t) for t in sorted(recent)]
    return items


def oracle_attention(q, frame_kv, items, grid, head_dim, patch=2, block=4):
    """Dense fp64 attention of q (N, heads, D), rotated at its own position, over `items`.

    frame_kv[t] = (k_raw, v) of frame t, each (N, heads, D), k not rotated. Merged blocks are built here
    from raw frames (patch means over `block` frames), rotated at (4m+1, patch top-left).
    """
    h, w = grid
    ks, vs = [], []
    for _, (what, idx), rope_t in items:
        if what == "frame":
            k, v = frame_kv[idx]
            ks.append(_rotate(k, [rope_t] * (h * w), *_grid_yx(h, w, 1), head_dim))
            vs.append(v)
        else:
            k = torch.stack([frame_kv[t][0] for t in range(idx * block, idx * block + block)]).mean(0)
            v = torch.stack([frame_kv[t][1] for t in range(idx * block, idx * block + block)]).mean(0)
            k, v = _patch_mean(k, grid, patch), _patch_mean(v, grid, patch)
            ys, xs = _grid_yx(math.ceil(h / patch), math.ceil(w / patch), patch)
            ks.append(_rotate(k, [rope_t] * len(ys), ys, xs, head_dim))
            vs.append(v)
    k = torch.cat(ks).double()
    v = torch.cat(vs).double()
    scores = torch.einsum("lhd,mhd->hlm", q.double(), k) / head_dim ** 0.5
    return torch.einsum("hlm,mhd->lhd", scores.softmax(-1), v)


def _grid_yx(h, w, step):
    ys = (torch.arange(h) * step).repeat_interleave(w)
    xs = (torch.arange(w) * step).repeat(h)
    return ys, xs


def _rotate(x, ts, ys, xs, head_dim):
    freqs = rope_table(torch.tensor(ts), ys, xs, head_dim)
    cos, sin = freqs.real.double(), freqs.imag.double()
    pairs = x.double().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(-2)


def _patch_mean(x, grid, patch):
    h, w = grid
    out = []
    for i in range(0, h, patch):
        for j in range(0, w, patch):
            idx = [y * w + xx for y in range(i, min(i + patch, h)) for xx in range(j, min(j + patch, w))]
            out.append(x[idx].double().mean(0))
    return torch.stack(out)


def rotate_frame(x, t, grid, head_dim):
    """Rotate one frame's tokens (N, heads, D) at temporal t, spatial raster positions."""
    ys, xs = _grid_yx(*grid, 1)
    return _rotate(x, [t] * len(ys), ys, xs, head_dim)
