"""Which videos to evaluate and which to compare, and decoding them frame by frame (imageio-ffmpeg).

Arguments are mp4 files or batch output folders. A folder's own mp4s are evaluated one by one; its
sub-folders (`out/rolling/x.mp4`, `out/pyramid/x.mp4`, as `pfgen generate --policies` writes them) are
policies, and videos of the same name under different policies form one comparison whose baseline is
`rolling` (else `full`, else the alphabetically first policy). Two or more mp4 files given on the command line form
one comparison against the first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pfgen.batch.manifest import MANIFEST, read_entries
from pfgen.errors import PfgenError

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
# The baseline of a comparison: the uniform-window cache, else all history, else the alphabetically first policy.
BASELINES = ("rolling", "full")
METADATA_PROMPT_KEYS = ("title", "description", "comment")  # where an mp4 from elsewhere may carry its prompt


@dataclass(frozen=True)
class VideoRef:
    path: Path
    label: str  # what tables and plots call it: `policy/name` in a batch folder, else the path as given
    policy: str | None = None  # the sub-folder of a batch output folder
    prompt: str | None = None  # from the batch manifest


@dataclass(frozen=True)
class Comparison:
    name: str
    videos: tuple[VideoRef, ...]  # the first is the baseline


@dataclass(frozen=True)
class Selection:
    videos: list[VideoRef]
    comparisons: list[Comparison]
    warnings: list[str]


def _is_video(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES and not path.name.startswith(".")


def _manifest_entries(folder: Path) -> list[dict]:
    return read_entries(folder / MANIFEST, strict=False)


def _scan_folder(folder: Path) -> tuple[list[VideoRef], list[Comparison], list[str]]:
    """A batch output folder: its own videos, and the policy sub-folders paired by video name."""
    entries = _manifest_entries(folder)
    prompts = {e["file"]: e.get("prompt") for e in entries}

    def ref(path: Path, policy: str | None) -> VideoRef:
        relative = path.relative_to(folder).as_posix()
        return VideoRef(path, relative.removesuffix(path.suffix), policy, prompts.get(relative))

    videos = [ref(p, None) for p in sorted(folder.iterdir()) if _is_video(p)]
    subfolders = {d.name: d for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")
                  and any(_is_video(p) for p in d.iterdir())}
    policies = sorted(subfolders, key=lambda p: (BASELINES.index(p) if p in BASELINES else len(BASELINES), p))
    by_name: dict[str, list[VideoRef]] = {}
    for policy in policies:
        for path in sorted(subfolders[policy].iterdir()):
            if _is_video(path):
                video = ref(path, policy)
                videos.append(video)
                by_name.setdefault(path.stem, []).append(video)
    comparisons, warnings = [], []
    for name, group in sorted(by_name.items()):
        if len(group) > 1:
            comparisons.append(Comparison(name, tuple(group)))
        elif len(policies) > 1:
            warnings.append(f"{group[0].path.name} is only in {group[0].policy}/ of {folder}: not compared")
    return videos, comparisons, warnings


def select_videos(paths: list[Path]) -> Selection:
    """The videos to evaluate and the comparisons among them; a bad path is a one-line error."""
    videos, comparisons, warnings, files = [], [], [], []
    for path in paths:
        path = Path(path).expanduser()
        if not path.exists():
            raise PfgenError(f"no such file or folder: {path}")
        if path.is_dir():
            found, compared, notes = _scan_folder(path)
            if not found:
                raise PfgenError(f"no videos in {path}", "give mp4 files or a pfgen batch output folder")
            videos += found
            comparisons += compared
            warnings += notes
        elif path.suffix.lower() not in VIDEO_SUFFIXES:
            raise PfgenError(f"{path} is not a video", f"give {', '.join(VIDEO_SUFFIXES)} files or a folder of them")
        else:
            files.append(VideoRef(path, str(path)))
    videos += files
    if len(files) > 1:
        comparisons.append(Comparison("command line", tuple(files)))
    return Selection(videos, comparisons, warnings)


@dataclass(frozen=True)
class VideoMeta:
    fps: float
    width: int
    height: int
    duration_s: float  # as the container says; fewer decoded frames than this means a truncated file


def _ffmpeg_failure(path: Path, exc: Exception) -> PfgenError:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = next((line for line in reversed(lines) if "Error" in line or "Invalid" in line or "moov" in line),
                  lines[-1] if lines else type(exc).__name__)
    return PfgenError(f"cannot read video {path}: {reason}", "the file is damaged, truncated or not a video")


def shorter_than_window(path: Path, seconds: float, window_s: float) -> PfgenError:
    return PfgenError(f"{path} is {seconds:.2f} s long, shorter than one {window_s:g} s window",
                      f"give --window {max(seconds, 0.01):.2f} or less, or a longer video")


def read_video(path: Path, min_seconds: float = 0.0) -> tuple[VideoMeta, Iterator[np.ndarray]]:
    """The video's metadata and an iterator over its (H, W, 3) uint8 RGB frames; a still image, or a video
    shorter than `min_seconds` by its container, is refused before decoding.

    The iterator raises a one-line error if the file ends before its container says it should (truncated)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        info = next(reader)
    except (OSError, RuntimeError, StopIteration) as exc:
        raise _ffmpeg_failure(path, exc) from None
    width, height = info["size"]
    meta = VideoMeta(float(info.get("fps") or 0.0), width, height, float(info.get("duration") or 0.0))
    if meta.fps <= 0 or meta.duration_s <= 0:  # a still image (a PNG renamed .mp4) has no duration
        reader.close()
        codec = str(info.get("codec") or "unknown").strip(", ")
        raise PfgenError(f"{path} is not a video (ffmpeg reads one {codec} image, with no duration)",
                         f"give {', '.join(VIDEO_SUFFIXES)} video files")
    if meta.duration_s < min_seconds - 0.5 / meta.fps:  # the container's duration is rounded; decoding decides
        reader.close()
        raise shorter_than_window(path, meta.duration_s, min_seconds)
    return meta, _frames(path, reader, meta)


def _frames(path: Path, reader, meta: VideoMeta) -> Iterator[np.ndarray]:
    count = 0
    try:
        for raw in reader:
            count += 1
            yield np.frombuffer(raw, dtype=np.uint8).reshape(meta.height, meta.width, 3)
    except (OSError, RuntimeError) as exc:
        raise _ffmpeg_failure(path, exc) from None
    finally:
        reader.close()
    expected = meta.duration_s * meta.fps
    if count == 0 or count < expected - max(2.0, 0.01 * expected):
        raise PfgenError(f"cannot read video {path}: {count} of {expected:.0f} frames decoded",
                         "the file is truncated or damaged")


def prompt_from_metadata(path: Path) -> str | None:
    """The prompt an mp4 carries: pfgen's JSON comment, else a title, description or comment tag."""
    from pfgen.video import read_metadata

    tags = {key.lower(): value for key, value in read_metadata(path).items()}
    try:
        made = json.loads(tags.get("comment", ""))
    except ValueError:
        made = None
    if isinstance(made, dict) and isinstance(made.get("prompt"), str):
        return made["prompt"]
    return next((tags[k] for k in METADATA_PROMPT_KEYS if tags.get(k)), None)
