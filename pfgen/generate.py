"""One video to one mp4, with timing and peak memory: what `pfgen generate` (and batch mode) runs per prompt."""

from __future__ import annotations

import dataclasses
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pfgen.frames import VAE_SPACE, latent_frames_for, video_frames_for
from pfgen.outputs import atomic_output
from pfgen.pipeline import Pipeline


LATENT_CHANNELS = 16  # the Wan VAE's


@dataclass
class VideoStats:
    path: str
    frames: int
    latent_frames: int
    video_seconds: float
    wall_seconds: float
    first_frame_seconds: float
    fps: float
    peak_memory_bytes: int
    memory_kind: str  # "cuda" (allocated by torch) or "rss" (process, CPU)
    metadata: dict  # how the video was made: prompt, seed, config, policy, pfgen version (also in the mp4)

    def to_json(self) -> dict:
        """`generate --json`: one object describing the finished video."""
        return {**dataclasses.asdict(self), "bytes": os.path.getsize(self.path)}

    def summary(self) -> str:
        return (f"wrote {self.path}: {self.frames} frames ({self.video_seconds:.1f} s of video) in "
                f"{self.wall_seconds:.1f} s, {self.fps:.1f} fps, peak memory {format_bytes(self.peak_memory_bytes)} "
                f"({self.memory_kind})")


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss"


def generate_video(pipe: Pipeline, prompt: str, output: str | Path, *, num_frames: int, seed: int,
                   policy: str | None = None, heads=None, height: int | None = None, width: int | None = None,
                   save_latents: str | Path | None = None, on_chunk=None) -> VideoStats:
    """Stream one prompt into `output` (mp4, atomic). `on_chunk(chunk, total_chunks)` reports progress."""
    output = Path(output)
    per_chunk = pipe.config.sampling.frames_per_chunk
    latent = latent_frames_for(num_frames, per_chunk)
    total_chunks = latent // per_chunk
    generator = torch.Generator(device=pipe.device).manual_seed(seed)
    kept = []
    reset_peak_memory(pipe.device)
    start = time.perf_counter()
    first = [0.0]

    def chunk_done(chunk):
        if chunk.index == 0:
            first[0] = time.perf_counter() - start
        if save_latents is not None:
            kept.append(chunk.latents.cpu())
        if on_chunk is not None:
            on_chunk(chunk, total_chunks)

    metadata = video_metadata(pipe, prompt, seed, policy or pipe.config.cache.policy)
    pipe.write_mp4(prompt, output, num_frames=video_frames_for(latent), generator=generator, policy=policy,
                   heads=heads, height=height, width=width, on_chunk=chunk_done, metadata=metadata)
    wall = time.perf_counter() - start
    if save_latents is not None:
        try:
            _save_latents(torch.cat(kept, dim=2), save_latents, prompt, seed)
        except BaseException:  # one run, one outcome: no video without its latents
            output.unlink(missing_ok=True)
            raise
    frames = video_frames_for(latent)
    peak, kind = peak_memory(pipe.device)
    return VideoStats(str(output), frames, latent, frames / pipe.config.video.fps, wall, first[0], frames / wall,
                      peak, kind, metadata)


def latents_bytes(cfg, num_frames: int, height: int | None, width: int | None) -> int:
    """Upper bound of the `--save-latents` file: 16 channels x latent frames x latent pixels in float32, plus
    the safetensors header."""

    latent = latent_frames_for(num_frames, cfg.sampling.frames_per_chunk)
    pixels = (height or cfg.video.height) // VAE_SPACE * ((width or cfg.video.width) // VAE_SPACE)
    return LATENT_CHANNELS * latent * pixels * 4 + 4096


def video_metadata(pipe: Pipeline, prompt: str, seed: int, policy: str) -> dict:
    """What is written into the mp4 (title = prompt, comment = JSON), so that a video says how it was made."""
    from pfgen import __version__

    model = pipe.config.model
    return {"prompt": prompt, "seed": seed, "config": model.name, "policy": policy, "checkpoint": model.checkpoint,
            "pfgen": __version__}


def _save_latents(latents: torch.Tensor, path: str | Path, prompt: str, seed: int) -> None:
    from safetensors.torch import save_file

    with atomic_output(path) as tmp:
        save_file({"latents": latents.contiguous()}, str(tmp), metadata={"prompt": prompt, "seed": str(seed)})
