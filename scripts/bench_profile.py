"""Cost of `pfgen profile-heads` capture relative to plain generation (rolling baseline, DiT only).

    python scripts/bench_profile.py --shape full   # H100, 1.3B shape, bf16, one 15 s calibration prompt
    python scripts/bench_profile.py --shape cpu    # reduced shape on a CPU

Runs the same prompt in one process without and with the logit recorder, alternating (--rounds), and
reports the best seconds per prompt of each, peak memory and the overhead of capture.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchlib import ROOT, SHAPES, append_markdown, device_name, sync, today
from bench_generate import make_pipeline
from pfgen.config import VideoConfig
from pfgen.frames import frames_for_seconds, latent_frames_for, video_frames_for
from pfgen.words import format_bytes
from pfgen.profile.capture import LogitRecorder


def one_prompt(pipe, latent: int, record: bool) -> tuple[float, int]:
    """(seconds, extra bytes): CUDA peak allocated on a GPU; on a CPU the recorder's own tensors (the only
    memory capture adds; a process's RSS cannot tell two runs in one process apart)."""
    device = pipe.device
    embeds = torch.randn(1, 512, pipe.transformer.config.text_dim, generator=torch.Generator().manual_seed(0))
    recorder = LogitRecorder(pipe.layers, pipe.heads, latent, device) if record else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    for _ in pipe.stream(prompt_embeds=embeds, num_frames=video_frames_for(latent), policy="rolling",
                         generator=torch.Generator(device=device).manual_seed(0), decode=False, observer=recorder):
        pass
    if recorder is not None:
        recorder.frame_logits()
    sync(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        return seconds, torch.cuda.max_memory_allocated(device)
    return seconds, recorder.nbytes() if recorder is not None else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--seconds", type=float, default=15.0, help="video seconds per calibration prompt")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--rounds", type=int, default=2, help="alternating plain / capture runs, best kept")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-markdown", action="store_true")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or shape.dtype)
    pipe = make_pipeline(shape, device, dtype, e2e=False)
    latent = latent_frames_for(frames_for_seconds(args.seconds, VideoConfig().fps), 3)
    one_prompt(pipe, 6, record=True)  # warm-up
    runs = [one_prompt(pipe, latent, record=record) for _ in range(args.rounds) for record in (False, True)]
    plain_s, plain_peak = min(runs[0::2])  # best of the rounds: machine noise only ever adds time
    capture_s, capture_peak = min(runs[1::2])
    memory = (f"peak {format_bytes(plain_peak)} -> {format_bytes(capture_peak)}" if device.type == "cuda"
              else f"capture holds {format_bytes(capture_peak)}")
    report = {"shape": shape.name, "device": device_name(device), "torch": torch.__version__, "date": today(),
              "dtype": str(dtype), "seconds_of_video": args.seconds, "latent_frames": latent,
              "plain_s": plain_s, "capture_s": capture_s, "overhead": capture_s / plain_s - 1,
              "plain_peak_bytes": plain_peak, "capture_peak_bytes": capture_peak, "memory": memory}
    print(f"{shape.name} on {report['device']}: one {args.seconds:.0f} s prompt, plain {plain_s:.2f} s, with capture "
          f"{capture_s:.2f} s (best of {args.rounds}): overhead {report['overhead']:+.1%}; {memory}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if not args.no_markdown:
        append_markdown(args.markdown, "bench_profile.py (profile-heads capture vs plain generation)",
                        "| date | device | torch | shape | dtype | video s | plain s | capture s | overhead | "
                        "memory |\n|---|---|---|---|---|---|---|---|---|---|",
                        f"| {report['date']} | {report['device']} | {report['torch']} | {shape.name} | {dtype} | "
                        f"{args.seconds:.0f} | {plain_s:.2f} | {capture_s:.2f} | {report['overhead']:+.1%} | "
                        f"{memory} |")


if __name__ == "__main__":
    main()
