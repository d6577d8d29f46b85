"""Seeing a video while it is made: `--preview` (the newest frame, replaced after every chunk) and
`--frames-dir` (every frame as a PNG). Images are encoded on a background thread, each written atomically
(`pfgen.outputs.atomic_output`), so a viewer never sees a half-written file and generation never waits on
the encoder unless it falls 4 chunks behind.
"""

from __future__ import annotations

from pathlib import Path

from pfgen.errors import PfgenError
from pfgen.outputs import atomic_output, check_folder_writable, check_output_path
from pfgen.video import FrameWorker

PREVIEW_SUFFIXES = (".jpg", ".jpeg", ".png")
FRAME_NAME = "frame_{:06d}.png"  # numbered from 0 in this run's video, like its mp4


def check_preview(path: Path) -> Path:
    path = Path(path).expanduser()
    if path.suffix.lower() not in PREVIEW_SUFFIXES:
        raise PfgenError(f"--preview file {path.name} must end in .jpg, .jpeg or .png")
    return check_output_path(path, option="--preview")


def check_frames_dir(path: Path) -> Path:
    """A folder that exists or can be created (its parent exists and is writable)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise PfgenError(f"--frames-dir {path} is a file", "give a folder")
    check_folder_writable(path if path.is_dir() else path.parent)
    return path


class FrameFiles:
    """`write(frames)` per chunk ((F, H, W, 3) uint8, numpy or `video.PendingFrames`); `close()` waits for the
    last images."""

    def __init__(self, frames_dir: Path | None = None, preview: Path | None = None):
        self.frames_dir, self.preview = frames_dir, preview
        if frames_dir is not None:
            frames_dir.mkdir(exist_ok=True)
        self.written = 0
        self._worker = FrameWorker(self._save)

    def write(self, frames) -> None:
        if self._worker.error is not None:
            raise self._worker.error
        self._worker.put(frames, self.written)
        self.written += len(frames)

    def _save(self, frames, first: int) -> None:
        from PIL import Image

        if self.frames_dir is not None:
            for i, frame in enumerate(frames):
                with atomic_output(self.frames_dir / FRAME_NAME.format(first + i)) as tmp:
                    Image.fromarray(frame).save(tmp)
        if self.preview is not None:
            options = {} if self.preview.suffix.lower() == ".png" else {"quality": 90}
            with atomic_output(self.preview) as tmp:
                Image.fromarray(frames[-1]).save(tmp, **options)

    def close(self) -> None:
        self._worker.finish()
        if self._worker.error is not None:
            raise self._worker.error

    def __enter__(self) -> "FrameFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
