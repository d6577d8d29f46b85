"""Streaming VAE decode and an mp4 writer that never holds the whole video.

The Wan VAE decoder is causal in time: it keeps a feature cache of earlier latent frames. Feeding latent
frames one by one through that cache across chunks equals a one-shot decode exactly (diffusers' `decode()`
clears the cache on every call, so it cannot be used chunk by chunk).
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

import numpy as np
import torch


class StreamingDecoder:
    """Latent chunks in, pixel frames out: 1 frame for the first latent frame, 4 for each later one."""

    def __init__(self, vae):
        self.vae = vae
        cfg = vae.config
        self.mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
        self.started = False

    def reset(self) -> None:
        self.vae.clear_cache()
        self.started = False

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, F, h, w) normalised latents -> (B, 3, frames, H, W) in [-1, 1]."""
        vae = self.vae
        dtype = next(vae.parameters()).dtype
        z = latents.to(dtype) * self.std.to(latents.device, dtype) + self.mean.to(latents.device, dtype)
        x = vae.post_quant_conv(z)
        outs = []
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            outs.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                    first_chunk=not self.started))
            self.started = True
        return torch.cat(outs, dim=2).clamp(-1.0, 1.0)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The causal feature cache as (tensors by index, JSON data): entries are tensors, None or "Rep"."""
        feats = self.vae._feat_map
        tensors = {str(i): f for i, f in enumerate(feats) if isinstance(f, torch.Tensor)}
        kinds = ["tensor" if isinstance(f, torch.Tensor) else f for f in feats]
        return tensors, {"started": self.started, "feat_map": kinds}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        kinds = meta["feat_map"]
        if len(kinds) != len(self.vae._feat_map) or any(k not in (None, "Rep", "tensor") for k in kinds):
            raise ValueError(f"saved VAE feature cache has {len(kinds)} entries, this VAE {len(self.vae._feat_map)}")
        device = self.vae.post_quant_conv.weight.device
        self.vae._feat_map = [tensors[str(i)].to(device) if k == "tensor" else k for i, k in enumerate(kinds)]
        self.started = bool(meta["started"])


def to_uint8_frames(video: torch.Tensor):
    """(3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8 on the host.

    On a GPU the copy is asynchronous (pinned memory + an event): the caller goes on launching the next
    chunk while the frames travel, and the mp4 writer thread waits for the event. Returns a numpy array,
    or a `PendingFrames` that the writer resolves.
    """
    frames = ((video.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0)
    if not frames.is_cuda:
        return frames.numpy()
    host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(frames, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return PendingFrames(host, event)


class PendingFrames:
    """Frames being copied from the GPU; `resolve()` waits for the copy (called on the writer thread)."""

    def __init__(self, host: torch.Tensor, event):
        self.host, self.event = host, event

    def __len__(self) -> int:
        return self.host.shape[0]

    def resolve(self) -> np.ndarray:
        self.event.synchronize()
        return self.host.numpy()


class Mp4Writer:
    """H.264 mp4 written by a background thread; the file appears only when complete.

    Frames go to `<dir>/.<name>.partial.mp4` and are renamed over `path` on `close()`. `abort()` (or leaving
    the `with` block on an exception) deletes the partial file.
    """

    def __init__(self, path: str | Path, width: int, height: int, fps: int = 16, preset: str = "veryfast"):
        import imageio_ffmpeg

        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.stem}.partial.mp4")
        self.frames_written = 0
        self._writer = imageio_ffmpeg.write_frames(
            str(self.tmp), (width, height), fps=fps, codec="libx264", macro_block_size=1, quality=None,
            output_params=["-preset", preset, "-crf", "18"], pix_fmt_out="yuv420p", ffmpeg_log_level="error",
        )
        self._writer.send(None)
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while (frames := self._queue.get()) is not None:
            try:
                if self._error is None:
                    frames = frames.resolve() if isinstance(frames, PendingFrames) else frames
                    self._writer.send(np.ascontiguousarray(frames))
            except BaseException as exc:  # surfaced on the caller's thread
                self._error = exc

    def write(self, frames) -> None:
        """Queue (F, H, W, 3) uint8 frames (numpy or `PendingFrames`); encoding overlaps with generation."""
        if self._error is not None:
            raise self._error
        self._queue.put(frames)
        self.frames_written += len(frames)

    def close(self) -> Path:
        self._queue.put(None)
        self._thread.join()
        self._writer.close()
        if self._error is not None:
            self._remove_tmp()
            raise self._error
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._queue.put(None)
        self._thread.join()
        try:
            self._writer.close()
        except Exception:
            pass
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        if self.tmp.exists():
            self.tmp.unlink()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False
