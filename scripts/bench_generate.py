"""Whole-chunk benchmark: rolling-21 (+3 sink) vs pyramid, same weights and inputs, one process.

    python scripts/bench_generate.py --shape full            # H100: 1.3B shape, 480x832, bf16, 80 chunks
    python scripts/bench_generate.py --shape cpu             # 4 layers x 3 heads x 128, 240x416, 40 chunks
    python scripts/bench_generate.py --tiny                  # seconds (kept alive by a test)
    python scripts/bench_generate.py --tiny --memory-minutes 10   # peak memory at 60 s vs 10 min

Per policy: ms per chunk (median of steady chunks and the first), DiT-only video fps, peak memory,
self-attention share, plan time; with --e2e (default on `full`) also VAE decode + mp4 encode fps and time
to first frame. Prints pyramid / rolling ratios and the ideal ratio 1 / (1 - s (1 - f)), writes JSON and
appends a row to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchlib import HEADS, ROOT, SHAPES, RegionTimer, append_markdown, device_name, median, \
    random_transformer, sync, today
from pfgen.config import CacheConfig, Config, SamplingConfig, VideoConfig
from pfgen.frames import VAE_TIME, frames_for_seconds, latent_frames_for, video_frames_for
from pfgen.words import format_bytes
from pfgen.heads import HeadTypes
from pfgen.pipeline import Pipeline

STEADY_FROM = 10  # chunks before this still fill the pyramid's containers (t_q >= 27)


def make_pipeline(shape, device, dtype, e2e: bool, backend: str = "auto") -> Pipeline:
    cfg = Config(sampling=SamplingConfig(), cache=CacheConfig(heads=str(HEADS / shape.heads_file), backend=backend),
                 video=VideoConfig(height=shape.height, width=shape.width))
    vae = None
    if e2e:
        from diffusers import AutoencoderKLWan

        from pfgen.wan.components import place

        torch.manual_seed(1)
        with torch.device(device):
            vae = place(AutoencoderKLWan(), device, dtype)
    return Pipeline(random_transformer(shape, device, dtype), vae, None, cfg, torch.device(device), dtype)


def fresh_cache(pipe: Pipeline, policy: str, latent: int):
    """Free the previous policy's cache before allocating this one, so peaks are not mixed."""
    pipe.release_cache()
    grid = pipe.latent_grid(pipe.config.video.height, pipe.config.video.width)
    return pipe.make_cache(policy, None, 1, grid, latent)


def run_policy(pipe: Pipeline, policy: str, chunks: int, e2e: bool, seed: int = 0) -> dict:
    """Generate `chunks` chunks; time each chunk's DiT work (and decode + encode when e2e)."""
    device = pipe.device
    latent = chunks * pipe.config.sampling.frames_per_chunk
    embeds = torch.randn(1, 512, pipe.transformer.config.text_dim, generator=torch.Generator().manual_seed(seed))
    embeds[:, 77:] = 0
    cache = fresh_cache(pipe, policy, latent)
    regions = {"attention": RegionTimer(device), "plan": RegionTimer("cpu")}
    writer, decoder = _writer(pipe) if e2e else (None, None)
    m = {"dit": [], "attn": [], "plan": [], "decode": [], "dit_peak": 0, "vae_peak": 0, "first_frame": None}
    _reset_peak(device)
    start = last = time.perf_counter()
    for chunk in pipe.stream(prompt_embeds=embeds, num_frames=video_frames_for(latent), policy=policy,
                             generator=torch.Generator(device=device).manual_seed(seed), decode=False,
                             timer=regions.__getitem__):
        sync(device)
        dit_end = time.perf_counter()
        m["dit"].append(dit_end - last)
        m["attn"].append(regions["attention"].take())
        m["plan"].append(regions["plan"].take())
        m["dit_peak"] = max(m["dit_peak"], _peak(device))
        if writer is not None:
            _decode_and_write(pipe, writer, decoder, chunk, m, start)
        _reset_peak(device)  # the next reading covers only the next chunk's DiT work
        last = time.perf_counter()
        m["decode"].append(last - dit_end)
    total = time.perf_counter() - start
    if writer is not None:
        writer.close()
    return _result(pipe, policy, chunks, cache, m, total if e2e else None)


def _decode_and_write(pipe, writer, decoder, chunk, m: dict, start: float) -> None:
    from pfgen.video import to_uint8_frames

    frames = to_uint8_frames(decoder.decode(chunk.latents)[0])
    writer.write(frames)
    if m["first_frame"] is None:
        _wait(frames)
        m["first_frame"] = time.perf_counter() - start
    m["vae_peak"] = max(m["vae_peak"], _peak(pipe.device))


def _result(pipe, policy: str, chunks: int, cache, m: dict, e2e_total: float | None) -> dict:
    steady = m["dit"][STEADY_FROM:] or m["dit"]
    tail = lambda key: m[key][STEADY_FROM:] or m[key]  # noqa: E731
    result = {
        "policy": policy, "chunks": chunks,
        "ms_per_chunk_steady": 1000 * median(steady), "ms_first_chunk": 1000 * m["dit"][0],
        "dit_fps": VAE_TIME * pipe.config.sampling.frames_per_chunk / median(steady),
        "attention_share": median([a / d for a, d in zip(tail("attn"), steady)]),
        "plan_share": median([p / d for p, d in zip(tail("plan"), steady)]),
        "peak_memory_bytes": m["dit_peak"], "memory_kind": "cuda max allocated (DiT)",
        "kv_cache_bytes": cache.nbytes(),
    }
    if e2e_total is not None:
        frames = video_frames_for(chunks * pipe.config.sampling.frames_per_chunk)
        result.update(e2e_fps=frames / e2e_total, time_to_first_frame_s=m["first_frame"],
                      decode_ms_steady=1000 * median(tail("decode")), peak_memory_vae_bytes=m["vae_peak"])
    return result


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def _writer(pipe):
    """An mp4 writer into a temporary folder and a fresh streaming decoder."""
    from pfgen.video import Mp4Writer, StreamingDecoder

    out = Path(tempfile.mkdtemp()) / "bench.mp4"
    decoder = StreamingDecoder(pipe.vae)
    decoder.reset()
    return Mp4Writer(out, pipe.config.video.width, pipe.config.video.height, pipe.config.video.fps), decoder


def _wait(frames) -> None:
    """Time to first frame ends when the first frames are on the host."""
    from pfgen.video import PendingFrames

    if isinstance(frames, PendingFrames):
        frames.event.synchronize()


def key_fraction(shape) -> float:
    from pfgen.inspect import cache_report

    types = HeadTypes.load(HEADS / shape.heads_file).types
    report = cache_report(CacheConfig(), types, 100, (shape.height // 16, shape.width // 16), shape.head_dim, 3)
    return report["summary"]["tokens_per_head_mean"] / report["summary"]["baseline_tokens_per_head"]


def summarise(shape, results: dict, device, dtype) -> dict:
    rolling, pyramid = results["rolling"], results["pyramid"]
    s, f = rolling["attention_share"], key_fraction(shape)
    ideal = 1.0 / (1.0 - s * (1.0 - f))
    speedup = rolling["ms_per_chunk_steady"] / pyramid["ms_per_chunk_steady"]
    return {
        "shape": shape.name, "device": device_name(device), "torch": torch.__version__, "dtype": str(dtype),
        "date": today(), "policies": results, "attention_share_rolling": s, "key_fraction": f,
        "ideal_speedup": ideal, "speedup": speedup, "fraction_of_ideal": speedup / ideal,
        "memory_ratio": pyramid["peak_memory_bytes"] / max(1, rolling["peak_memory_bytes"]),
    }


def print_summary(r: dict) -> None:
    print(f"\n{r['shape']} on {r['device']} ({r['dtype']}, torch {r['torch']})")
    for name, p in r["policies"].items():
        line = (f"  {name:8s} {p['ms_per_chunk_steady']:9.1f} ms/chunk (first {p['ms_first_chunk']:.1f}), "
                f"{p['dit_fps']:6.1f} DiT fps, attention {p['attention_share']:.0%}, plan {p['plan_share']:.1%}, "
                f"peak {format_bytes(p['peak_memory_bytes'])}, KV cache {format_bytes(p['kv_cache_bytes'])}")
        if "e2e_fps" in p:
            line += f", e2e {p['e2e_fps']:.1f} fps, first frame {p['time_to_first_frame_s']:.2f} s"
        print(line)
    print(f"  pyramid / rolling: {r['speedup']:.2f}x faster; ideal 1/(1-s(1-f)) = {r['ideal_speedup']:.2f}x "
          f"(s = {r['attention_share_rolling']:.2f}, f = {r['key_fraction']:.3f}); {r['fraction_of_ideal']:.0%} "
          f"of ideal; peak memory ratio {r['memory_ratio']:.3f}")


def memory_run(shape, device, dtype, seconds: float, policy: str = "pyramid") -> int:
    """Peak memory of one run of `seconds` of video in this (fresh) process, DiT only: CUDA max
    allocated, or the process's peak RSS on a CPU."""
    pipe = make_pipeline(shape, device, dtype, e2e=False)
    latent = latent_frames_for(frames_for_seconds(seconds, VideoConfig().fps), pipe.config.sampling.frames_per_chunk)
    run_policy(pipe, policy, latent // pipe.config.sampling.frames_per_chunk, e2e=False)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_peak(flags: list[str], seconds: float, policy: str = "pyramid") -> int:
    """Peak memory of a run in a fresh process: a process's peak RSS cannot be reset, so CPU runs that
    must be compared each get their own."""
    cmd = [sys.executable, __file__, *flags, "--memory-run", str(seconds), "--memory-policy", policy]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def memory_check(flags: list[str], minutes: float) -> dict:
    """Pyramid peak memory at 60 s and at `minutes` of video, each in its own process."""
    out = {f"{s:.0f}s": child_peak(flags, s) for s in (60, 60 * minutes)}
    values = list(out.values())
    out["ratio"] = values[1] / values[0]
    print(f"pyramid peak memory: {', '.join(f'{k}: {format_bytes(v)}' for k, v in out.items() if k != 'ratio')}"
          f" (ratio {out['ratio']:.4f})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("full", "cpu"), default="cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny shape (seconds)")
    parser.add_argument("--chunks", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=None,
                        help="include VAE decode + mp4 encoding (default: on for --shape full)")
    parser.add_argument("--memory-minutes", type=float, default=None,
                        help="instead: pyramid peak memory at 60 s vs this many minutes")
    parser.add_argument("--memory-run", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-policy", default="pyramid", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-markdown", action="store_true")
    args = parser.parse_args()
    shape = SHAPES["tiny" if args.tiny else args.shape]
    dtype = getattr(torch, args.dtype or shape.dtype)
    device = torch.device(args.device)
    if args.memory_run:
        print(memory_run(shape, device, dtype, args.memory_run, args.memory_policy))
        return
    flags = ["--tiny"] if args.tiny else ["--shape", args.shape]
    flags += ["--device", args.device] + (["--dtype", args.dtype] if args.dtype else [])
    if args.memory_minutes:
        report = {"shape": shape.name, "device": device_name(device), "date": today(),
                  "memory": memory_check(flags, args.memory_minutes)}
    else:
        e2e = args.e2e if args.e2e is not None else shape.name == "full"
        pipe = make_pipeline(shape, device, dtype, e2e)
        chunks = args.chunks or shape.chunks
        run_policy(pipe, "rolling", min(chunks, 3), e2e=False)  # warm-up: kernels, allocator, caches
        results = {policy: run_policy(pipe, policy, chunks, e2e) for policy in ("rolling", "pyramid")}
        if device.type != "cuda":  # peak RSS per policy needs a process each (12 chunks reach steady state)
            for policy, result in results.items():
                result["peak_memory_bytes"] = child_peak(flags, 12 * 3 * VAE_TIME / VideoConfig().fps, policy)
                result["memory_kind"] = "process peak RSS (own process, 12 chunks)"
        report = summarise(shape, results, device, dtype)
        print_summary(report)
        if not args.no_markdown:
            _markdown_row(args.markdown, report, e2e)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def _markdown_row(path: Path, r: dict, e2e: bool) -> None:
    ro, py = r["policies"]["rolling"], r["policies"]["pyramid"]
    e2e_cell = f"{ro['e2e_fps']:.1f} / {py['e2e_fps']:.1f}" if e2e else "-"
    append_markdown(path, "bench_generate.py (whole chunks, rolling-21 vs pyramid)",
                    "| date | device | torch | shape | dtype | rolling ms/chunk | pyramid ms/chunk | speedup | ideal | "
                    "attention share s | key fraction f | peak rolling | peak pyramid | KV rolling | KV pyramid | "
                    "e2e fps r / p |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
                    f"| {r['date']} | {r['device']} | {r['torch']} | {r['shape']} | {r['dtype']} | "
                    f"{ro['ms_per_chunk_steady']:.1f} | {py['ms_per_chunk_steady']:.1f} | {r['speedup']:.2f}x | "
                    f"{r['ideal_speedup']:.2f}x | {r['attention_share_rolling']:.2f} | {r['key_fraction']:.3f} | "
                    f"{format_bytes(ro['peak_memory_bytes'])} | {format_bytes(py['peak_memory_bytes'])} | "
                    f"{format_bytes(ro['kv_cache_bytes'])} | {format_bytes(py['kv_cache_bytes'])} | {e2e_cell} |")


if __name__ == "__main__":
    main()
