"""Seeing a video while it is made: `--preview` (the newest frame, replaced after every chunk) and
`--frames-dir` (every frame as a PNG). Images are encoded on a background thread, each written atomically
(`pfgen.outputs.atomic_output`), so a viewer never sees a half-written file and generation never waits on
the encoder unless it falls 4 chunks behind.

Both follow the mp4's rules (docs/reliability.md): an existing preview or a folder holding frames is replaced
only with --overwrite; a frames folder then holds this run's frames only (the old ones wait in a hidden folder
until the run's outcome is known, and come back if it fails). A run that fails or is interrupted removes its
frames and its preview, unless it keeps the frames up to its last saved state (`keep`).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from pfgen.errors import PfgenError
from pfgen.outputs import atomic_output, check_folder_writable, check_output_path, is_partial, temp_path
from pfgen.video import FrameWorker
from pfgen.words import count

PREVIEW_SUFFIXES = (".jpg", ".jpeg", ".png")
FRAME_NAME = "frame_{:06d}.png"  # numbered from 0 in this run's video, like its mp4
FRAME_FILE = re.compile(r"frame_\d{6,}\.png")


def check_preview(path: Path, overwrite: bool = False) -> Path:
    path = Path(path).expanduser()
    if path.suffix.lower() not in PREVIEW_SUFFIXES:
        raise PfgenError(f"--preview file {path.name} must end in .jpg, .jpeg or .png")
    return check_output_path(path, option="--preview", overwrite=overwrite)


def check_frames_dir(path: Path, overwrite: bool = False) -> Path:
    """A folder that can be created (its parent exists and is writable), or one that holds no files but frames
    (replaced only with `overwrite`)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise PfgenError(f"--frames-dir {path} is a file", "give a folder")
    if not path.is_dir():
        check_folder_writable(path.parent)
        return path
    names = [p.name for p in path.iterdir() if not is_partial(p)]
    others = sorted(name for name in names if not FRAME_FILE.fullmatch(name))
    if others:
        raise PfgenError(f"--frames-dir {path} holds files that are not frames ({others[0]})",
                         "give an empty or a new folder")
    if names and not overwrite:
        raise PfgenError(f"--frames-dir {path} already holds {count(len(names), 'frame')}",
                         "pass --overwrite (-y) to replace them, or choose another folder")
    check_folder_writable(path)
    return path


class FrameFiles:
    """`write(frames)` per chunk ((F, H, W, 3) uint8, numpy or `video.PendingFrames`); then `close()` (success),
    `keep(frames)` (a failed run keeps its first frames) or `discard()` (a failed run keeps nothing)."""

    def __init__(self, frames_dir: Path | None = None, preview: Path | None = None):
        self.frames_dir, self.preview = frames_dir, preview
        self._created, self._replaced = False, None
        if frames_dir is not None:
            if frames_dir.is_dir():
                old = [p for p in frames_dir.iterdir() if FRAME_FILE.fullmatch(p.name)]
                if old:  # checked: --overwrite was given; set aside until the run's outcome is known
                    self._replaced = temp_path(frames_dir / "replaced")
                    self._replaced.mkdir()
                    for frame in old:
                        os.replace(frame, self._replaced / frame.name)
            else:
                frames_dir.mkdir()
                self._created = True
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
        """Success: wait for the last images; the replaced frames go."""
        self._worker.finish()
        if self._worker.error is not None:
            raise self._worker.error
        self._drop_replaced()

    def keep(self, frames: int) -> bool:
        """After a failure: keep frames 0..frames-1 (False, and nothing kept, if they could not all be written).
        The preview goes: it is no video."""
        self._worker.finish()
        if self._worker.error is not None or self.frames_dir is None:
            self.discard()
            return False
        self._remove_frames(frames)
        self._drop_replaced()
        self._remove_preview()
        return True

    def discard(self) -> None:
        """After a failure: remove this run's frames and preview; frames it was to replace come back."""
        self._worker.cancel()
        if self.frames_dir is not None:
            self._remove_frames(0)
            if self._replaced is not None:
                for frame in self._replaced.iterdir():
                    os.replace(frame, self.frames_dir / frame.name)
                self._drop_replaced()
            if self._created:
                try:
                    self.frames_dir.rmdir()
                except OSError:  # someone put a file there meanwhile: theirs stays
                    pass
        self._remove_preview()

    def _remove_frames(self, first: int) -> None:
        for i in range(first, self.written):
            (self.frames_dir / FRAME_NAME.format(i)).unlink(missing_ok=True)

    def _drop_replaced(self) -> None:
        if self._replaced is not None:
            shutil.rmtree(self._replaced, ignore_errors=True)
            self._replaced = None

    def _remove_preview(self) -> None:
        if self.preview is not None:
            self.preview.unlink(missing_ok=True)
