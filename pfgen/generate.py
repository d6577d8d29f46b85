"""One video to one mp4, with timing and peak memory: what `pfgen generate` (and batch mode) runs per prompt."""

from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pfgen.frames import VAE_SPACE, latent_frames_for, video_frames_for
from pfgen.outputs import atomic_output
from pfgen.pipeline import Pipeline
from pfgen.story import Story
from pfgen.timeline import Entry, video_frame
from pfgen.words import format_bytes, shorten


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
    switches: list[dict] = field(default_factory=list)  # prompts and when they took over (timeline.switch_record)
    state_bytes: int | None = None  # size of the saved state (--save-state)

    def to_json(self) -> dict:
        """`generate --json`: one object describing the finished video (or frames folder)."""
        path = Path(self.path)
        return {**dataclasses.asdict(self), "bytes": path.stat().st_size if path.is_file() else None}

    def summary(self) -> str:
        text = (f"wrote {self.path}: {self.frames} frames ({self.video_seconds:.1f} s of video) in "
                f"{self.wall_seconds:.1f} s, {self.fps:.1f} fps, peak memory {format_bytes(self.peak_memory_bytes)} "
                f"({self.memory_kind})")
        if len(self.switches) > 1 or any(s["video_frame"] for s in self.switches):
            text += "; prompts from " + ", ".join(f"{s['seconds']:.2f} s (frame {s['video_frame']}) "
                                                  f"{shorten(s['prompt'])}" for s in self.switches)
        return text




def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss"


def generate_video(pipe: Pipeline, prompt: str | None, output: str | Path | None, *, num_frames: int, seed: int,
                   policy: str | None = None, heads=None, height: int | None = None, width: int | None = None,
                   save_latents: str | Path | None = None, on_chunk=None, story: Story | None = None, resume=None,
                   save_state: str | Path | None = None, save_state_every: int = 0, files=None,
                   image=None) -> VideoStats:
    """Stream one prompt, or a `story` (timeline, interactive prompts), into `output` (mp4, atomic; None when
    only `files`, a `pfgen.sinks.FrameFiles`, takes the frames). `resume` (pfgen.state.RunState) continues a
    saved run; `save_state` saves this one after its last chunk and every `save_state_every` chunks.
    `image` (path or PIL image) is the first frame (image-to-video). `on_chunk(chunk, total_chunks)` reports
    progress."""
    from pfgen.state import save_state as write_state
    from pfgen.video import to_uint8_frames

    output = Path(output) if output is not None else None
    per_chunk = pipe.config.sampling.frames_per_chunk
    latent = latent_frames_for(num_frames, per_chunk)
    total_chunks = latent // per_chunk
    start = resume.position if resume is not None else 0
    if resume is not None:
        height, width = resume.size(height, width)
    story = story or Story([Entry(0.0, prompt)] if prompt is not None else None)
    generator = torch.Generator(device=pipe.device).manual_seed(seed)
    kept = []
    reset_peak_memory(pipe.device)
    start_time = time.perf_counter()
    first_frame = [0.0]
    state_bytes = [None]

    def chunk_done(chunk):
        if chunk.index == 0:
            first_frame[0] = time.perf_counter() - start_time
        if save_latents is not None:
            kept.append(chunk.latents.cpu())
        if files is not None:
            files.write(to_uint8_frames(chunk.frames[0]))
        done = chunk.index + 1
        if save_state is not None and (done == total_chunks or (save_state_every and done % save_state_every == 0)):
            state_bytes[0] = write_state(save_state, pipe, story, pipe.state.cache)
        if on_chunk is not None:
            on_chunk(chunk, total_chunks)

    opening = story.entries[0].prompt if story.entries else (resume.meta["prompt"] if resume is not None else None)
    metadata = pipe.video_metadata(opening, seed, policy)
    kwargs = dict(num_frames=video_frames_for(latent), generator=generator, policy=policy, heads=heads,
                  height=height, width=width, story=story, resume=resume, commit_last=save_state is not None,
                  image=image)
    try:
        if output is not None:
            pipe.write_mp4(None, output, on_chunk=chunk_done, metadata=metadata, **kwargs)
        else:
            for chunk in pipe.stream(**kwargs):
                chunk_done(chunk)
    finally:
        if files is not None:
            files.close()
    wall = time.perf_counter() - start_time
    label = story.switches[0]["prompt"] if story.switches else str(story.prompt)
    if save_latents is not None:
        try:
            _save_latents(torch.cat(kept, dim=2), save_latents, label, seed)
        except BaseException:  # one run, one outcome: no video without its latents
            if output is not None:
                output.unlink(missing_ok=True)
            raise
    frames = video_frame(start + latent, start)
    peak, kind = peak_memory(pipe.device)
    return VideoStats(str(output if output is not None else files.frames_dir), frames, latent,
                      frames / pipe.config.video.fps, wall, first_frame[0], frames / wall, peak, kind, metadata,
                      list(story.switches), state_bytes[0])


def latents_bytes(cfg, num_frames: int, height: int | None, width: int | None) -> int:
    """Upper bound of the `--save-latents` file: 16 channels x latent frames x latent pixels in float32, plus
    the safetensors header."""
    latent = latent_frames_for(num_frames, cfg.sampling.frames_per_chunk)
    pixels = (height or cfg.video.height) // VAE_SPACE * ((width or cfg.video.width) // VAE_SPACE)
    return LATENT_CHANNELS * latent * pixels * 4 + 4096



def _save_latents(latents: torch.Tensor, path: str | Path, prompt: str, seed: int) -> None:
    from safetensors.torch import save_file

    with atomic_output(path) as tmp:
        save_file({"latents": latents.contiguous()}, str(tmp), metadata={"prompt": prompt, "seed": str(seed)})
