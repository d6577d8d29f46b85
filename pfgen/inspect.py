"""What every head reads for one query frame, what it costs, and what the cache stores (`pfgen inspect-cache`).

Torch-free. The rules advance frame by frame, but their steady state is periodic: past a warm-up of a few
dozen frames, the layout read at chunk t0 + k * period is the layout at t0 with every frame after the sink
moved by k * period (`Steady`). So any query frame is answered by simulating a bounded stretch and moving
the frame numbers back, in the same time at frame 1e9 as at frame 100. `full` has no steady state (it reads
every earlier frame), so it is simulated and capped at `MAX_FULL_FRAME`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace

from pfgen.cache.policy import Layout, Segment, make_rule, merged_tokens
from pfgen.errors import PfgenError

BYTES_BF16 = 2
BASELINE_WINDOW = 21  # the uniform cache pfgen is compared with (Self Forcing's rolling window)
MAX_FULL_FRAME = 2048  # `full` lists every earlier frame for every head: past this the report is just big
PLOT_SPAN = 100  # history frames the pyramid plot shows before the query chunk's end (besides the sink)


def layout_tokens(layout: Layout, frame_tokens: int, block_tokens: int) -> tuple[int, int]:
    """(K/V tokens stored in bf16, merge-accumulator tokens stored in fp32) per head for a rule's layout."""
    abs_tokens = layout.abs_tokens(frame_tokens, block_tokens)
    hist_tokens = layout.hist_partitions * layout.hist_slots * frame_tokens
    return abs_tokens + hist_tokens, (block_tokens if layout.merge_block else 0)


@dataclass(frozen=True)
class Steady:
    """From chunk start `start` on, a rule's reads repeat every `period` frames: frames and RoPE positions
    at or above `fixed` (the sink) move with the query, merged block indices move by period / block."""

    period: int
    start: int
    fixed: int
    block: int = 0


def steady_state(kind: str, cache_cfg, frames_per_chunk: int) -> Steady | None:
    """The periodic steady state of one head type's rule (None for `full`, which keeps everything).

    `start` is generous on purpose: the window (or the recent frames, the RoPE window and a full middle
    FIFO) lies past the sink, so nothing the query reads is still filling up.
    """
    if kind == "full":
        return None
    if kind == "rolling":
        r = cache_cfg.rolling
        return Steady(frames_per_chunk, r.window + frames_per_chunk, r.sink)
    p = cache_cfg.pyramid
    c = getattr(p, kind)
    step = {"anchor": "stride", "wave": "period", "veil": "block"}[kind]
    step = getattr(c, step)
    start = c.sink + p.recent + p.rope_window + (c.capacity + 2) * step + frames_per_chunk
    return Steady(math.lcm(frames_per_chunk, step), start, c.sink, c.block if kind == "veil" else 0)


def simulate(kind: str, cache_cfg, t0: int, frames_per_chunk: int):
    """The rule of `kind` run over chunks 0 .. t0 - F and placed for the chunk at t0: (rule, its reads)."""
    rule = make_rule(kind, cache_cfg, frames_per_chunk, max_frames=t0 + frames_per_chunk)
    for start in range(0, t0, frames_per_chunk):
        rule.begin_chunk(start, frames_per_chunk)
        rule.commit(start, frames_per_chunk)
    rule.begin_chunk(t0, frames_per_chunk)
    return rule, rule.reads(t0, frames_per_chunk)


def plan_at(kind: str, cache_cfg, frame: int, frames_per_chunk: int):
    """(layout, segments) query frame `frame` reads: simulated up to an equivalent frame of the steady state
    (at most `start + period` frames in), then moved back to `frame`."""
    t0 = frame - frame % frames_per_chunk
    steady = steady_state(kind, cache_cfg, frames_per_chunk)
    if steady is None and frame > MAX_FULL_FRAME:
        raise PfgenError(f"--frame {frame} is too far for the full policy: it reads every earlier frame",
                         f"use --frame {MAX_FULL_FRAME} or less")
    delta = 0
    if steady is not None and t0 >= steady.start + steady.period:
        delta = (t0 - steady.start) // steady.period * steady.period
    rule, reads = simulate(kind, cache_cfg, t0 - delta, frames_per_chunk)
    segments = reads[frame - t0].segments
    if delta:
        segments = tuple(_moved(seg, delta, steady) for seg in segments)
    return rule.layout, segments


def _moved(seg: Segment, delta: int, steady: Steady) -> Segment:
    def move(values):
        return tuple(v + delta if v >= steady.fixed else v for v in values)

    blocks = tuple(m + delta // steady.block for m in seg.blocks) if seg.blocks else ()
    return replace(seg, frames=move(seg.frames), rope_t=move(seg.rope_t), blocks=blocks)


def check_frame(frame: float) -> int:
    """`--frame` as a frame number (1e9 is accepted: it is a whole number)."""
    if not math.isfinite(frame) or frame != int(frame):
        raise PfgenError(f"--frame must be a whole number, got {frame:g}")
    if frame < 0:
        raise PfgenError(f"--frame must be zero or more, got {frame:g}")
    return int(frame)


def cache_report(cache_cfg, head_types, frame: int, grid: tuple[int, int], head_dim: int,
                 frames_per_chunk: int) -> dict:
    """The `inspect-cache --json` document for query frame `frame` (noisy passes of its chunk)."""
    frame = check_frame(frame)
    n = grid[0] * grid[1]
    t0 = frame - frame % frames_per_chunk
    kinds = sorted({k for row in head_types for k in row})
    segments, stored = {}, {}
    for kind in kinds:
        layout, read = plan_at(kind, cache_cfg, frame, frames_per_chunk)
        block = merged_tokens(*grid, layout.merge_patch) if layout.merge_block else 0
        segments[kind] = [_segment(s, n, block) for s in read]
        kv_tokens, acc_tokens = layout_tokens(layout, n, block)
        stored[kind] = 2 * head_dim * (kv_tokens * BYTES_BF16 + acc_tokens * 4)
    heads = [
        {"layer": l, "head": h, "type": kind, "tokens": sum(s["tokens"] for s in segments[kind]),
         "segments": segments[kind]}
        for l, row in enumerate(head_types) for h, kind in enumerate(row)
    ]
    count = len(heads)
    baseline_tokens = BASELINE_WINDOW * n
    return {
        "frame": frame, "chunk": t0 // frames_per_chunk, "tokens_per_frame": n,
        "heads": heads,
        "summary": {
            "tokens_per_head_mean": sum(h["tokens"] for h in heads) / count,
            "baseline_tokens_per_head": baseline_tokens,
            "kv_bytes": sum(stored[h["type"]] for h in heads),
            "baseline_kv_bytes": count * 2 * head_dim * baseline_tokens * BYTES_BF16,
            "heads_per_type": dict(Counter(h["type"] for h in heads)),
            "kv_bytes_per_head": stored,
        },
    }


def _segment(seg, frame_tokens: int, block_tokens: int) -> dict:
    tokens = len(seg.blocks) * block_tokens if seg.kind == "merge" else len(seg.frames) * frame_tokens
    return {"kind": seg.kind, "frames": list(seg.frames), "rope_t": list(seg.rope_t), "tokens": tokens}


def pyramid_rows(report: dict) -> list[tuple[str, dict[int, str]]]:
    """Rows for `plots.plot_cache_pyramid`: per head (grouped by type), the segment each frame is read through."""
    rows = []
    order = {"wave": 0, "anchor": 1, "veil": 2}
    for head in sorted(report["heads"], key=lambda h: (order.get(h["type"], 3), h["layer"], h["head"])):
        kinds = {t: seg["kind"] for seg in head["segments"] for t in seg["frames"]}
        rows.append((f"L{head['layer']}H{head['head']} {head['type'][0]}", kinds))
    return rows


def pyramid_columns(report: dict, frames_per_chunk: int, span: int = PLOT_SPAN) -> list[int]:
    """Frames the pyramid plot shows: the sink frames any head reads, then the last `span` frames up to the
    end of the query chunk (a bounded width at any frame number; older frames in between are a gap)."""
    end = (report["chunk"] + 1) * frames_per_chunk
    first = max(0, end - span)
    sinks = {t for h in report["heads"] for s in h["segments"] if s["kind"] == "sink" for t in s["frames"]}
    return sorted(t for t in sinks if t < first) + list(range(first, end))


def inspect_geometry(cfg, heads_file, policy: str | None, height: int, width: int):
    """(head types, head_dim, latent token grid) to inspect, without loading weights.

    Layers x heads come from the head-type file when there is one, else from the model's architecture as the
    memory plan reads it (config or tensor shapes on disk; the Wan2.1-1.3B shape for weights not on disk).
    """
    from pfgen.config import check_video_size
    from pfgen.frames import latent_grid, vae_space
    from pfgen.heads import head_type_rows, head_type_source
    from pfgen.memory import architectures

    arch, _, vae, _ = architectures(cfg.model)
    layers, n_heads, head_dim = arch["num_layers"], arch["num_attention_heads"], arch["attention_head_dim"]
    space, patch = vae_space(vae), arch["patch_size"]
    check_video_size(height, width, space * patch[1], option_prefix="--")
    latent = latent_grid(height, width, space)
    grid = (latent[0] // patch[1], latent[1] // patch[2])
    policy = policy or ("pyramid" if heads_file or cfg.cache.heads or cfg.cache.all else cfg.cache.policy)
    source = head_type_source(cfg.cache, policy, heads_file)
    if not isinstance(source, str) and source is not None:
        layers, n_heads = source.layers, source.heads
    return head_type_rows(source, policy, layers, n_heads), head_dim, grid
