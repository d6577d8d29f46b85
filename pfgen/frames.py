"""Frame arithmetic, in one place and torch-free.

The Wan VAE turns T latent frames into 1 + 4 (T - 1) video frames (the first latent frame is one video frame,
each later one four) and s x s pixels into one latent pixel, where s is the VAE's spatial factor (8 for Wan2.1's,
4 for a world-model variant: `vae_space`). The chunk loop works in whole chunks of `frames_per_chunk` latent
frames.
"""

from __future__ import annotations

import math

from pfgen.errors import PfgenError

VAE_TIME = 4  # video frames per latent frame (after the first)
DEFAULT_SECONDS = 5.0
MAX_SECONDS = 3600  # longer videos need --force (a typo like --seconds 6000000 must not run for weeks)


WAN_VAE_SPACE = 8  # the Wan2.1 VAE's pixels per latent pixel, each way


def vae_space(vae_config) -> int:
    """Pixels per latent pixel, each way, of a VAE config (a dict or a diffusers config): its
    `scale_factor_spatial`; the Wan2.1 VAE's where it has none (configs from before diffusers named it) or
    there is no VAE (a pipeline that makes latents only)."""
    return WAN_VAE_SPACE if vae_config is None else int(vae_config.get("scale_factor_spatial", WAN_VAE_SPACE))


def latent_grid(height: int, width: int, space: int) -> tuple[int, int]:
    """Latent (h, w) of a video size, for a VAE of spatial factor `space`."""
    return height // space, width // space


def video_frames_for(latent: int) -> int:
    """Latent frames -> video frames."""
    return 1 + VAE_TIME * (latent - 1)


def latent_frames_for(num_frames: int, frames_per_chunk: int) -> int:
    """Video frames -> latent frames, rounded up to whole chunks."""
    if num_frames < 1:
        raise PfgenError(f"the video needs at least one frame, got {num_frames}")
    latent = (num_frames - 1 + VAE_TIME - 1) // VAE_TIME + 1
    return math.ceil(latent / frames_per_chunk) * frames_per_chunk


def latent_frames_for_seconds(seconds: float, fps: int) -> int:
    """A duration -> latent frames: seconds x fps / 4, at least one (docs/design.md section 1: 5 s -> 20,
    60 s -> 240)."""
    if not math.isfinite(seconds) or seconds <= 0:
        raise PfgenError(f"--seconds must be a positive number, got {seconds}")
    latent = seconds * fps / VAE_TIME
    if not math.isfinite(latent):  # 1e308 seconds is a finite number, its frame count is not
        raise PfgenError(f"--seconds {seconds:g} is too long to count in frames", "give a realistic length")
    return max(1, math.ceil(latent - 1e-9))


def frames_for_seconds(seconds: float, fps: int) -> int:
    """A duration -> video frames (1 + 4 (T - 1)); the chunk loop later rounds T up to whole chunks."""
    return video_frames_for(latent_frames_for_seconds(seconds, fps))


def length_in_frames(seconds: float | None, frames: int | None, fps: int, force: bool = False) -> int:
    """The video length the command line asks for (`--seconds` or `--frames`, default 5 s), in video frames.

    Lengths past MAX_SECONDS are refused unless `force`."""
    if seconds is not None and frames is not None:
        raise PfgenError("give --seconds or --frames, not both")
    if frames is not None:
        if frames < 1:
            raise PfgenError(f"--frames must be at least 1, got {frames}")
        num_frames, option = frames, f"--frames {frames}"
    else:
        num_frames = frames_for_seconds(DEFAULT_SECONDS if seconds is None else seconds, fps)
        option = f"--seconds {seconds:g}" if seconds is not None else ""
    if num_frames > MAX_SECONDS * fps + 1 and not force:
        raise PfgenError(f"{option} asks for {num_frames / fps / 3600:.3g} hours of video",
                         f"lengths over {MAX_SECONDS // 60} minutes need --force")
    return num_frames


def chunk_video_frames(latent_done: int) -> int:
    """Video frames that exist once `latent_done` latent frames are decoded (0 before the first)."""
    return video_frames_for(latent_done) if latent_done > 0 else 0


def dit_passes(steps: int, first_steps: int | None, chunks: int, *, fresh: bool = True, image: bool = False,
               commit_last: bool = False) -> int:
    """DiT forward passes of a run that generates `chunks` chunks: each chunk's denoising steps (`steps`, or
    `first_steps` for the video's first generated chunk of a `fresh` run when the config has a first-chunk
    list), one clean pass per chunk that a later chunk reads (the last one too with `commit_last`), and one
    for an `image` committed as frame 0. Re-cache at a prompt switch adds its own (docs/story.md)."""
    if chunks <= 0:
        return int(image)
    first = first_steps if first_steps and fresh else steps
    return first + (chunks - 1) * steps + chunks - 1 + int(commit_last) + int(image)
