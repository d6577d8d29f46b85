"""Streaming VAE decode and an mp4 writer that never holds the whole video.

The Wan VAE decoder is causal in time: it keeps a feature cache of earlier latent frames. Feeding latent
frames one by one through that cache across chunks equals a one-shot decode exactly (diffusers' `decode()`
clears the cache on every call, so it cannot be used chunk by chunk).
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from pfgen.errors import PfgenError
from pfgen.outputs import atomic_output


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
        if meta.get("kind") == "tae":
            raise ValueError("it was saved with the tae decoder; resume with --decoder tae")
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


def _ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def decoded_frames(path: str | Path) -> int:
    """Decode every frame of an mp4's video stream and count them; a file that does not decode cleanly
    (no moov atom, truncated, not a video) is a `PfgenError`."""
    cmd = [_ffmpeg(), "-nostdin", "-v", "error", "-i", str(path), "-map", "0:v:0", "-f", "null",
           "-progress", "pipe:1", "-nostats", "-"]
    run = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    counts = [line.split("=", 1)[1] for line in run.stdout.splitlines() if line.startswith("frame=")]
    if run.returncode != 0 or run.stderr.strip() or not counts:
        reason = (run.stderr.strip().splitlines() or ["no video stream"])[-1]
        raise PfgenError(f"{path} is not a readable video: {reason}")
    return int(counts[-1])


_FFMETADATA_SPECIAL = re.compile(r"([=;#\\\n])")


def _metadata_file(tags: dict[str, str]) -> str:
    """The tags as an ffmetadata file in the temp folder (= ; # \\ and newlines escaped with a backslash)."""
    fd, name = tempfile.mkstemp(prefix="pfgen-", suffix=".ffmetadata")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(";FFMETADATA1\n")
        for key, value in tags.items():
            f.write(key + "=" + _FFMETADATA_SPECIAL.sub(r"\\\1", str(value)) + "\n")
    return name


def mp4_tags(metadata: dict | None) -> dict[str, str] | None:
    """How a video was made as mp4 tags: its first prompt as the title, all of it (JSON) as the comment."""
    if not metadata:
        return None
    return {"title": metadata.get("prompt") or "", "comment": json.dumps(metadata)}


def read_metadata(path: str | Path) -> dict[str, str]:
    """The container's metadata tags (what `Mp4Writer(metadata=...)` wrote)."""
    run = subprocess.run([_ffmpeg(), "-nostdin", "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
                         capture_output=True, text=True, errors="replace")
    tags = {}
    for line in re.findall(r"((?:\\.|[^\\\n])*)\n", run.stdout, re.DOTALL):  # an escaped newline continues
        if "=" in line and not line.startswith((";", "[")):
            key, value = line.split("=", 1)
            tags[key] = re.sub(r"\\(.)", r"\1", value, flags=re.DOTALL)  # = ; # \ and newline are escaped
    return tags


class FrameWorker:
    """Frames handed to `consume(frames, *extra)` in order on a background thread, resolved from the GPU there
    (`PendingFrames`). The queue is bounded, so generation runs at most 4 chunks ahead of the consumer; the
    first error is kept in `error` for the caller's thread, and later frames are dropped."""

    def __init__(self, consume):
        self._consume = consume
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.cancelled = False  # frames still queued are dropped (`cancel`)
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.error is not None or self.cancelled:
                continue
            frames, extra = item
            try:
                self._consume(frames.resolve() if isinstance(frames, PendingFrames) else frames, *extra)
            except BaseException as exc:  # surfaced on the caller's thread
                self.error = exc

    def put(self, frames, *extra) -> None:
        self._queue.put((frames, extra))

    def cancel(self) -> None:
        """Drop the frames still queued and wait for the one being consumed."""
        self.cancelled = True
        self.finish()

    def finish(self) -> None:
        """Wait until every queued frame is consumed (once; later calls return at once)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


def _without_prefix(line: str) -> str:
    """An ffmpeg error line without its "[out#0/mp4 @ 0x...]" prefix."""
    return re.sub(r"^\[[^]]*\]\s*", "", line)


class Mp4Writer:
    """H.264 mp4 encoded by ffmpeg fed from a background thread; the file appears only when complete and
    verified.

    ffmpeg encodes into a temp file beside `path`; `close()` checks its exit status, copies the stream into a
    second temp file with the metadata tags (known only at the end: prompts typed while it ran), decodes that
    back and compares its frame count with what was written, and only then renames it over `path`
    (`pfgen.outputs.atomic_output`); any failure is a one-line `PfgenError` and leaves nothing behind.
    `abort()` (or leaving the `with` block on an exception) deletes the temp files. `keep(frames, metadata)`
    instead keeps the first `frames` frames after a failure (a run's last saved state): `cuttable=True` encodes
    without B-frames, so that the stream can be cut after any frame by copying it.
    """

    def __init__(self, path: str | Path, width: int, height: int, fps: int = 16, preset: str = "veryfast",
                 metadata: dict[str, str] | None = None, cuttable: bool = False):
        self.path = Path(path)
        self.metadata = metadata
        self._output = atomic_output(self.path)
        self.tmp = self._output.__enter__()
        self._encoded = atomic_output(self.path)  # what ffmpeg writes; never renamed, copied into self.tmp
        self.frames_written = 0
        self.done = False  # closed, kept or aborted
        self.finished: Path | None = None  # the file, once in place
        cmd = [_ffmpeg(), "-y", "-nostdin", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{width}x{height}", "-r", str(fps), "-i", "pipe:0", "-map", "0:v", "-an",
               "-c:v", "libx264", "-preset", preset, "-crf", "18", *(["-bf", "0"] if cuttable else []),
               "-pix_fmt", "yuv420p", str(self._encoded.tmp)]
        # Own session: a Ctrl-C in the terminal reaches pfgen, which then stops ffmpeg itself.
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, start_new_session=True)
        except BaseException:
            self._output.discard()
            raise
        self._stderr: list[str] = []
        self._stderr_thread = threading.Thread(target=self._collect_stderr, daemon=True)
        self._stderr_thread.start()
        self._worker = FrameWorker(lambda frames: self._proc.stdin.write(np.ascontiguousarray(frames).tobytes()))

    def _collect_stderr(self) -> None:
        for line in iter(self._proc.stderr.readline, b""):
            self._stderr.append(line.decode(errors="replace").strip())

    def write(self, frames) -> None:
        """Queue (F, H, W, 3) uint8 frames (numpy or `PendingFrames`); encoding overlaps with generation."""
        if self._worker.error is not None:
            self.abort()
            raise self._encoder_error()
        self._worker.put(frames)
        self.frames_written += len(frames)

    def _encoder_error(self) -> PfgenError:
        reason = next((line for line in reversed(self._stderr) if line), None) or str(self._worker.error)
        return PfgenError(f"could not encode {self.path}: {_without_prefix(reason)}")

    def _finish_encoding(self) -> None:
        """Hand ffmpeg every queued frame and wait for it; its failure is a PfgenError."""
        self._worker.finish()
        try:
            self._proc.stdin.close()
        except OSError as exc:  # the pipe broke: ffmpeg died
            self._worker.error = self._worker.error or exc
        code = self._proc.wait()
        self._stderr_thread.join()
        self._proc.stderr.close()
        if self._worker.error is not None or code != 0:
            raise self._encoder_error()

    def _publish(self, frames: int, metadata: dict[str, str] | None) -> Path:
        """Copy the first `frames` frames of the encoded stream, with the tags, into place, verified."""
        tags = _metadata_file(metadata) if metadata else None  # a file: a 1 MB prompt is no argument
        try:
            cmd = [_ffmpeg(), "-y", "-nostdin", "-v", "error", "-i", str(self._encoded.tmp),
                   *(["-f", "ffmetadata", "-i", tags, "-map_metadata", "1"] if tags else []), "-map", "0:v",
                   "-c", "copy", "-frames:v", str(frames), str(self.tmp)]
            run = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
            if run.returncode != 0:
                reason = (run.stderr.strip().splitlines() or ["ffmpeg failed"])[-1]
                raise PfgenError(f"could not encode {self.path}: {_without_prefix(reason)}")
        finally:
            self._encoded.discard()
            if tags is not None:
                os.unlink(tags)
        found = decoded_frames(self.tmp)
        if found != frames:
            raise PfgenError(f"{self.path}: the encoded video holds {found} frames, {frames} were written")
        self.finished = self._output.commit()
        return self.finished

    def close(self, metadata: dict[str, str] | None = None) -> Path:
        """Finish the file (tags: `metadata`, else the constructor's), verify it, and move it into place."""
        self.done = True
        try:
            self._finish_encoding()
            return self._publish(self.frames_written, metadata if metadata is not None else self.metadata)
        except BaseException:
            self.abort()
            raise

    def keep(self, frames: int, metadata: dict[str, str] | None) -> Path | None:
        """After a failure: the first `frames` frames as the finished file (verified), or None (nothing kept)
        when the encoder failed too."""
        self.done = True
        try:
            self._finish_encoding()
            return self._publish(frames, metadata)
        except BaseException:  # noqa: BLE001 - a second signal is ignored by the CLI; any failure keeps nothing
            self.abort()
            return None

    def abort(self) -> None:
        self.done = True
        self._worker.finish()
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._stderr_thread.join()
        self._proc.stderr.close()
        self._encoded.discard()
        self._output.discard()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.done:
            return False
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False
