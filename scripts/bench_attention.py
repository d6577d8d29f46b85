"""One self-attention layer at steady state: dense SDPA over 21 frames vs the pyramid layout, per backend.

    python scripts/bench_attention.py --shape full      # H100: 12 heads x 128, 1560 tokens/frame, bf16
    python scripts/bench_attention.py --shape cpu       # 12 heads x 128, 390 tokens/frame, fp32

Times `KVCache.attend` (RoPE of q/k, writing the chunk, attention over the cache; no projections) for the
rolling-21 window (3 sink frames) and for one layer in the shipped pyramid proportions (5 wave, 6 anchor,
1 veil of 12 heads), plus a bare dense SDPA call and the ideal pyramid time at the dense FLOP rate. Also
times the per-chunk plan.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchlib import SHAPES, ROOT, append_markdown, attention_layer_types, device_name, median, sync, today
from pfgen.attention import get_backend
from pfgen.cache.engine import CacheGeometry, KVCache
from pfgen.config import CacheConfig
from pfgen.rope import frame_table

STEADY_T0 = 99  # query frames 99..101: every container full, history past the 21-frame window


def steady_cache(types, shape, grid, backend, dtype, device, frames_per_chunk=3):
    """A 1-layer cache advanced to STEADY_T0 with random committed K/V."""
    geometry = CacheGeometry(1, len(types), shape.head_dim, grid, 1, STEADY_T0 + frames_per_chunk)
    cache = KVCache(CacheConfig(), [types], geometry, frames_per_chunk, dtype, device,
                    get_backend(backend, device, geometry.theta))
    n = grid[0] * grid[1]
    for t0 in range(0, STEADY_T0, frames_per_chunk):
        cache.begin_chunk(t0, frames_per_chunk)
        cache.set_pass(commit=True)
        qkv = torch.randn(3, 1, frames_per_chunk * n, len(types), shape.head_dim, device=device, dtype=dtype)
        cache.attend(0, *qkv, frame_table(range(t0, t0 + 3), *grid, shape.head_dim, device=device))
    return cache


def time_calls(fns: dict, device, repeat: int) -> dict:
    """Median seconds of each fn(), measured round-robin so that drifting machine load hits all alike."""
    for fn in fns.values():
        for _ in range(2):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: median(values) for name, values in times.items()}


def key_tokens(cache) -> list[int]:
    """Keys each head reads at the steady chunk (first query frame; all three are equal there)."""
    plan = cache.plan
    out = []
    for kind in cache.head_types[0]:
        read = plan.rules[kind].reads[0]
        store = cache.stores[0][kind]
        abs_tokens = sum(store.abs_range(s)[1] - store.abs_range(s)[0] for s in read.abs_slots)
        out.append(abs_tokens + len(read.hist_slots) * store.frame_tokens)
    return out


def run(shape_name: str, device, dtype, repeat: int, backends=("split", "sdpa")) -> dict:
    """Time the layer per backend; `pyramid[split]` is always included (the key counts come from it)."""
    shape = SHAPES[shape_name]
    grid = (shape.height // 16, shape.width // 16)
    n = grid[0] * grid[1]
    heads, d = shape.attention_heads, shape.head_dim
    q, k, v = (torch.randn(1, 3 * n, heads, d, device=device, dtype=dtype) for _ in range(3))
    rope = frame_table(range(STEADY_T0, STEADY_T0 + 3), *grid, d, device=device)
    dense_k = torch.randn(1, heads, 21 * n, d, device=device, dtype=dtype)
    dense_q = q.transpose(1, 2).contiguous()
    calls = {"dense_sdpa": lambda: F.scaled_dot_product_attention(dense_q, dense_k, dense_k)}
    layouts = {"rolling[split]": (["rolling"] * heads, "split")}
    for backend in dict.fromkeys(("split", *backends)):
        layouts[f"pyramid[{backend}]"] = (attention_layer_types(shape), backend)
    tokens, plan_seconds = {}, []
    for name, (types, backend) in layouts.items():
        cache = steady_cache(types, shape, grid, backend, dtype, device)
        sync(device)
        t = time.perf_counter()
        cache.begin_chunk(STEADY_T0, 3)
        plan_seconds.append(time.perf_counter() - t)
        cache.set_pass(commit=False)
        calls[name] = lambda cache=cache: cache.attend(0, q, k, v, rope)
        tokens[name] = key_tokens(cache)
    results = time_calls(calls, device, repeat)
    dense_flops = 4 * 3 * n * 21 * n * d * heads
    pyramid_flops = sum(4 * 3 * n * t * d for t in tokens["pyramid[split]"])
    rate = dense_flops / results["dense_sdpa"]
    report = {
        "shape": shape_name, "device": device_name(device), "torch": torch.__version__, "dtype": str(dtype),
        "date": today(), "tokens_per_frame": n, "heads": heads,
        "key_fraction": pyramid_flops / dense_flops,
        "ms": {name: 1000 * s for name, s in results.items()},
        "tflops": {name: (pyramid_flops if name.startswith("pyramid") else dense_flops) / s / 1e12
                   for name, s in results.items()},
        "ideal_pyramid_ms": 1000 * pyramid_flops / rate,
        "speedup_split_vs_rolling": results["rolling[split]"] / results["pyramid[split]"],
        "plan_ms": 1000 * median(plan_seconds),
    }
    return report


def print_report(r: dict) -> None:
    print(f"{r['shape']} on {r['device']}, {r['dtype']}, {r['heads']} heads, {r['tokens_per_frame']} tokens/frame, "
          f"pyramid key fraction {r['key_fraction']:.3f}")
    for name, ms in r["ms"].items():
        print(f"  {name:16s} {ms:9.2f} ms  {r['tflops'][name]:7.1f} TFLOP/s")
    print(f"  ideal pyramid    {r['ideal_pyramid_ms']:9.2f} ms  (pyramid FLOPs at the dense SDPA rate)")
    print(f"  pyramid[split] vs rolling[split]: {r['speedup_split_vs_rolling']:.2f}x; plan {r['plan_ms']:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: the shape's (bf16 full, fp32 cpu)")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-markdown", action="store_true")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype or SHAPES[args.shape].dtype)
    report = run(args.shape, args.device, dtype, args.repeat)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if not args.no_markdown:
        ms = report["ms"]
        append_markdown(args.markdown, "bench_attention.py (one self-attention layer, steady state)",
                        "| date | device | torch | shape | dtype | dense SDPA ms | rolling ms | pyramid split ms | "
                        "pyramid sdpa ms | ideal ms | split vs rolling | plan ms |\n"
                        "|---|---|---|---|---|---|---|---|---|---|---|---|",
                        f"| {report['date']} | {report['device']} | {report['torch']} | {report['shape']} | "
                        f"{args.dtype or SHAPES[args.shape].dtype} | {ms['dense_sdpa']:.2f} | "
                        f"{ms['rolling[split]']:.2f} | {ms['pyramid[split]']:.2f} | {ms['pyramid[sdpa]']:.2f} | "
                        f"{report['ideal_pyramid_ms']:.2f} | {report['speedup_split_vs_rolling']:.2f}x | "
                        f"{report['plan_ms']:.2f} |")


if __name__ == "__main__":
    main()
