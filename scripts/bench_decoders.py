#!/usr/bin/env python
"""Decode time per chunk, the tiny decoder (`--decoder tae`) against the Wan VAE, side by side.

Both stream chunks of `--chunk` latent frames the way a run does (`TaeStreamingDecoder`, `StreamingDecoder`),
with random weights (speed does not depend on them): the Wan2.1 VAE architecture (diffusers'
`AutoencoderKLWan` defaults) and the taew2_1 decoder. The first chunk is warm-up (it also decodes fewer
frames); the steady chunks are timed, alternating tae and wan so both see the same machine load. Also
measured: each decoder's transient memory per chunk (CPU: the RSS high-water mark over a decode).

    python scripts/bench_decoders.py                    # 480x832, CPU, 3 steady chunks each
    python scripts/bench_decoders.py --tiny             # seconds, for the tests
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import ROOT, append_markdown, device_name, median, sync, today  # noqa: E402


def build(tiny: bool, device, dtype):
    from diffusers import AutoencoderKLWan

    from pfgen.video import StreamingDecoder
    from pfgen.wan.components import place
    from pfgen.wan.tae import TaeStreamingDecoder, load_tae
    from pfgen.wan.tiny import TINY_VAE

    torch.manual_seed(0)
    vae = place(AutoencoderKLWan(**(TINY_VAE if tiny else {})), device, dtype)
    return {"tae": TaeStreamingDecoder(load_tae(None, device, dtype)), "wan": StreamingDecoder(vae)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny VAE at 32x48 (seconds)")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--chunk", type=int, default=3, help="latent frames per chunk")
    ap.add_argument("--chunks", type=int, default=3, help="steady chunks timed per decoder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args(argv)
    if args.tiny:
        args.height, args.width = 32, 48
    dtype = getattr(torch, args.dtype)
    decoders = build(args.tiny, args.device, dtype)
    latents = torch.randn(1, 16, args.chunk * (args.chunks + 1), args.height // 8, args.width // 8,
                          device=args.device, dtype=dtype)
    ms = {name: [] for name in decoders}
    rss = {}
    for name, decoder in decoders.items():
        decoder.reset()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        decoder.decode(latents[:, :, :args.chunk])  # warm-up: the first chunk
        rss[name] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    for i in range(1, args.chunks + 1):
        for name, decoder in decoders.items():
            sync(args.device)
            start = time.perf_counter()
            frames = decoder.decode(latents[:, :, i * args.chunk:(i + 1) * args.chunk])
            sync(args.device)
            ms[name].append((time.perf_counter() - start) * 1000)
            assert frames.shape[2] == 4 * args.chunk
    result = dict(device=device_name(args.device), torch=torch.__version__, size=[args.height, args.width],
                  dtype=args.dtype, chunk_latent_frames=args.chunk, video_frames_per_chunk=4 * args.chunk,
                  ms_per_chunk={k: median(v) for k, v in ms.items()}, runs_ms=ms,
                  first_chunk_rss_growth_bytes=rss)
    result["wan_over_tae"] = result["ms_per_chunk"]["wan"] / result["ms_per_chunk"]["tae"]
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    header = ("| date | device | torch | size | dtype | chunk | tae ms/chunk | wan ms/chunk | wan / tae |\n"
              "|---|---|---|---|---|---|---|---|---|")
    row = (f"| {today()} | {result['device']} | {result['torch']} | {args.height}x{args.width} | {args.dtype} | "
           f"{args.chunk} latent = {4 * args.chunk} frames | {result['ms_per_chunk']['tae']:.0f} | "
           f"{result['ms_per_chunk']['wan']:.0f} | {result['wan_over_tae']:.1f}x |")
    append_markdown(Path(args.markdown), "bench_decoders.py (decode time per chunk, tae vs wan)", header, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
