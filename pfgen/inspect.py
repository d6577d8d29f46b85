"""What every head reads for one query frame, what it costs, and what the cache stores (`pfgen inspect-cache`).

Torch-free: the rules are simulated from frame 0 to the chunk of the query frame.
"""

from __future__ import annotations

from collections import Counter

from pfgen.cache.policy import Layout, make_rule, merged_tokens

BYTES_BF16 = 2
BASELINE_WINDOW = 21  # the uniform cache pfgen is compared with (Self Forcing's rolling window)


def layout_tokens(layout: Layout, frame_tokens: int, block_tokens: int) -> tuple[int, int]:
    """(K/V tokens stored in bf16, merge-accumulator tokens stored in fp32) per head for a rule's layout."""
    abs_tokens = sum(frame_tokens if kind == "frame" else block_tokens for kind in layout.abs_slots)
    hist_tokens = layout.hist_partitions * layout.hist_slots * frame_tokens
    return abs_tokens + hist_tokens, (block_tokens if layout.merge_block else 0)


def cache_report(cache_cfg, head_types, frame: int, grid: tuple[int, int], head_dim: int,
                 frames_per_chunk: int) -> dict:
    """The `inspect-cache --json` document for query frame `frame` (noisy passes of its chunk)."""
    if frame < 0:
        raise ValueError(f"--frame must be zero or more, got {frame}")
    n = grid[0] * grid[1]
    t0 = frame - frame % frames_per_chunk
    kinds = sorted({k for row in head_types for k in row})
    segments, stored = {}, {}
    for kind in kinds:
        rule = make_rule(kind, cache_cfg, frames_per_chunk, max_frames=t0 + frames_per_chunk)
        for start in range(0, t0, frames_per_chunk):
            rule.begin_chunk(start, frames_per_chunk)
            rule.commit(start, frames_per_chunk)
        rule.begin_chunk(t0, frames_per_chunk)
        read = rule.reads(t0, frames_per_chunk)[frame - t0]
        block = merged_tokens(*grid, rule.layout.merge_patch) if rule.layout.merge_block else 0
        segments[kind] = [_segment(s, n, block) for s in read.segments]
        kv_tokens, acc_tokens = layout_tokens(rule.layout, n, block)
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


def inspect_geometry(cfg, heads_file, policy: str | None, height: int, width: int):
    """(head types, head_dim, latent token grid) to inspect, without loading weights.

    Layers x heads come from the head-type file when there is one, else from the model: the embedded tiny
    model, or the Wan2.1-1.3B shape (30 x 12 x 128) for real checkpoints.
    """
    from pfgen.config import check_video_size
    from pfgen.heads import head_type_rows, head_type_source
    from pfgen.wan.tiny import TINY_TRANSFORMER

    tiny = cfg.model.checkpoint is None and cfg.model.name == "tiny"
    layers, n_heads = (TINY_TRANSFORMER["num_layers"], TINY_TRANSFORMER["num_attention_heads"]) if tiny else (30, 12)
    head_dim = TINY_TRANSFORMER["attention_head_dim"] if tiny else 128
    check_video_size(height, width, option_prefix="--")
    grid = (height // 16, width // 16)
    policy = policy or ("pyramid" if heads_file or cfg.cache.heads or cfg.cache.all else cfg.cache.policy)
    source = head_type_source(cfg.cache, policy, heads_file)
    if not isinstance(source, str) and source is not None:
        layers, n_heads = source.layers, source.heads
    return head_type_rows(source, policy, layers, n_heads), head_dim, grid
