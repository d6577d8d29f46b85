"""Every target of issue 14 on one GPU, in one process, in a few minutes; writes one JSON.

    python scripts/bench_gpu.py --json OUT.json            # 1.3B shape, 480x832, bf16 (scripts/gpu_session.sh)
    python scripts/bench_gpu.py --tiny --device cpu --json OUT.json   # the script itself, in seconds

Measures, side by side in this process: one self-attention layer (dense SDPA, rolling-21, pyramid per
backend, the ideal pyramid time at the dense rate); whole steady chunks of rolling-21 (+3 sink) and of the
pyramid per backend (DiT only, peak memory); the pyramid end to end with its best backend (VAE decode + mp4
encode overlapped with the DiT, time to first frame). Each target is reported with its value and whether it
is met. The side-by-side timing against the Self Forcing reference is compare_reference.py's (gpu_session.sh).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

import bench_attention
from bench_generate import STEADY_FROM, key_fraction, make_pipeline, run_policy
from benchlib import SHAPES, device_name, today
from pfgen.attention import triton_available

TARGETS = {  # name: (threshold, "min" | "max")
    "chunk_speedup": (1.40, "min"),  # pyramid vs rolling-21 per steady chunk
    "chunk_fraction_of_ideal": (0.90, "min"),  # of 1 / (1 - s (1 - f))
    "layer_speedup": (1.60, "min"),  # one attention layer, pyramid vs rolling
    "layer_vs_ideal": (1.30, "max"),  # pyramid layer time / its ideal time
    "e2e_over_dit_fps": (0.85, "min"),
    "time_to_first_frame_s": (1.0, "max"),
    "memory_ratio": (1.0, "max"),  # pyramid peak / rolling peak
}


def backends(device) -> list[str]:
    return ["split"] + (["triton"] if torch.device(device).type == "cuda" and triton_available() else [])


def set_backend(pipe, backend: str) -> None:
    pipe.config = dataclasses.replace(pipe.config, cache=dataclasses.replace(pipe.config.cache, backend=backend))


def measure(shape_name: str, device, dtype, chunks: int, repeat: int) -> dict:
    shape = SHAPES[shape_name]
    names = backends(device)
    layer = bench_attention.run(shape_name, device, dtype, repeat, backends=names)
    pipe = make_pipeline(shape, device, dtype, e2e=True)
    run_policy(pipe, "rolling", min(chunks, 3), e2e=False)  # warm-up: kernels, allocator, caches
    runs = {"rolling": run_policy(pipe, "rolling", chunks, e2e=False)}
    for name in names:
        set_backend(pipe, name)
        run_policy(pipe, "pyramid", min(chunks, 2), e2e=False)  # compile / warm the backend's kernels
        runs[f"pyramid[{name}]"] = run_policy(pipe, "pyramid", chunks, e2e=False)
    best = min(names, key=lambda b: runs[f"pyramid[{b}]"]["ms_per_chunk_steady"])
    set_backend(pipe, best)
    e2e = run_policy(pipe, "pyramid", chunks, e2e=True)
    pipe.release_cache()

    rolling, pyramid = runs["rolling"], runs[f"pyramid[{best}]"]
    s, f = rolling["attention_share"], key_fraction(shape)
    ideal = 1.0 / (1.0 - s * (1.0 - f))
    speedup = rolling["ms_per_chunk_steady"] / pyramid["ms_per_chunk_steady"]
    layer_best = min(names, key=lambda b: layer["ms"][f"pyramid[{b}]"])
    layer_ms = layer["ms"][f"pyramid[{layer_best}]"]
    values = {
        "chunk_speedup": speedup, "chunk_fraction_of_ideal": speedup / ideal,
        "layer_speedup": layer["ms"]["rolling[split]"] / layer_ms,
        "layer_vs_ideal": layer_ms / layer["ideal_pyramid_ms"],
        "e2e_over_dit_fps": e2e["e2e_fps"] / pyramid["dit_fps"],
        "time_to_first_frame_s": e2e["time_to_first_frame_s"],
        # CUDA peaks only: a CPU process's peak RSS cannot be reset between runs (bench_generate.py --memory-*)
        "memory_ratio": (pyramid["peak_memory_bytes"] / rolling["peak_memory_bytes"]
                         if device.type == "cuda" else None),
    }
    targets = {name: {"value": values[name], "target": t, "kind": kind, "met": _met(values[name], t, kind)}
               for name, (t, kind) in TARGETS.items()}
    return {"shape": shape_name, "device": device_name(device), "torch": torch.__version__, "dtype": str(dtype),
            "date": today(), "chunks": chunks, "steady_from": STEADY_FROM, "backends": names,
            "best_chunk_backend": best, "best_layer_backend": layer_best, "attention_share_rolling": s,
            "key_fraction": f, "ideal_speedup": ideal, "targets": targets, "layer": layer, "chunks_ms": runs,
            "e2e": e2e}


def _met(value, threshold: float, kind: str) -> bool | None:
    if value is None:
        return None
    return value >= threshold if kind == "min" else value <= threshold


def print_report(r: dict) -> None:
    print(f"\n{r['shape']} on {r['device']} ({r['dtype']}, torch {r['torch']}), backends {', '.join(r['backends'])}")
    for name, ms in r["layer"]["ms"].items():
        print(f"  layer {name:16s} {ms:9.2f} ms")
    print(f"  layer ideal pyramid    {r['layer']['ideal_pyramid_ms']:9.2f} ms")
    for name, run in r["chunks_ms"].items():
        peak = run["peak_memory_bytes"] / 2**30
        print(f"  chunk {name:16s} {run['ms_per_chunk_steady']:9.1f} ms, peak {peak:.2f} GiB")
    for name, t in r["targets"].items():
        sign = ">=" if t["kind"] == "min" else "<="
        state = "n/a " if t["met"] is None else "met " if t["met"] else "MISS"
        value = "       -" if t["value"] is None else f"{t['value']:8.3f}"
        print(f"  {state} {name:26s} {value} (target {sign} {t['target']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny shape (checks the script, not the GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chunks", type=int, default=16, help="per run; steady medians from chunk 10 on")
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per attention layout")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    shape = "tiny" if args.tiny else "full"
    report = measure(shape, torch.device(args.device), getattr(torch, SHAPES[shape].dtype), args.chunks, args.repeat)
    print_report(report)
    args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
