"""The world scorer (torch-free): how well a video shows what its prompt names, per frame and per window.

Every pixel is classified to its nearest colour of the whole palette (all object colours, all backgrounds
and their striped copies), so a wrong background or a wrong object colour is seen as such. Per frame:
- background accuracy: of the pixels not classified as a named object's colour, the share nearest the named
  background (either of its two stripe colours when striped);
- presence of each named object: its colour's blob near its robust centre, with an area in the range the
  grammar's sizes allow and the right shape class (fill ratio of its bounding box: square ~1, ball ~0.79,
  triangle ~0.5);
- spurious area: the share of pixels farther than SPURIOUS_DISTANCE from every named colour;
- the object's centroid (for motion periods).
Per window: the shares of frames with the background right / each object present, the mean spurious area,
background stability (the window's per-pixel most frequent classes against the first window's; and where the
changed pixels came from and went), and the measured motion period of each object over the whole video
(autocorrelation of its centroid track).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pfgen.world.grammar import BACKGROUNDS, FPS, OBJECT_COLOURS, PERIODS, STRIPE_LIFT, Scene
from pfgen.world.render import SIZE_RANGE

BACKGROUND_OK = 0.9  # a frame's background is right when this share of its non-object pixels is
SPURIOUS_DISTANCE = 60.0  # RGB distance beyond which a pixel belongs to no named colour
FILL_BOUNDS = (0.64, 0.88)  # fill ratio below: triangle, between: ball, above: square
AREA_SLACK = (0.5, 1.6)  # the blob's area against the grammar's smallest and largest shape


def _palette() -> tuple[list[str], np.ndarray]:
    names, colours = [], []
    for name, rgb in OBJECT_COLOURS.items():
        names.append(name), colours.append(rgb)
    for name, rgb in BACKGROUNDS.items():
        names += [f"bg:{name}", f"bg:{name}+"]
        colours += [rgb, tuple(min(255, c + STRIPE_LIFT) for c in rgb)]
    return names, np.array(colours, dtype=np.float32)


NAMES, COLOURS = _palette()


def classify(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) uint8 -> (F, H, W) index into NAMES of each pixel's nearest palette colour."""
    return _squared_distances(frames, COLOURS).argmin(-1).astype(np.int16)


def _squared_distances(frames: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """(F, H, W, colours) squared RGB distances, as |p|^2 - 2 p.c + |c|^2 (one matmul)."""
    pixels = frames.astype(np.float32)
    return np.maximum((pixels ** 2).sum(-1, keepdims=True) - 2 * pixels @ colours.T + (colours ** 2).sum(-1), 0)


def _area_range(shape: str, height: int) -> tuple[float, float]:
    factor = {"ball": np.pi, "square": 4.0, "triangle": np.sqrt(3.0)}[shape]
    low, high = (s * height for s in SIZE_RANGE)
    return AREA_SLACK[0] * factor * low ** 2, AREA_SLACK[1] * factor * high ** 2


def shape_of(fill: float) -> str:
    return "triangle" if fill < FILL_BOUNDS[0] else "ball" if fill < FILL_BOUNDS[1] else "square"


def _blob(mask: np.ndarray, reach: float):
    """(area, fill ratio, centre x, centre y) of the blob of a boolean mask around its robust centre, or None.

    Columns are first rolled so that the widest empty run of columns sits at the edge: an object that
    wraps around the frame is measured whole."""
    if not mask.any():
        return None
    width = mask.shape[1]
    empty = ~mask.any(0)
    shift = 0
    if empty.any():
        runs = np.concatenate([empty, empty]).astype(np.int8)
        best, length = 0, 0
        for i, e in enumerate(runs):  # longest run of empty columns, circularly
            length = length + 1 if e else 0
            if length > best:
                best, shift = min(length, width), (i + 1) % width
    rolled = np.roll(mask, -shift, axis=1)
    ys, xs = np.nonzero(rolled)
    cy, cx = np.median(ys), np.median(xs)
    near = (ys - cy) ** 2 + (xs - cx) ** 2 <= reach ** 2
    ys, xs = ys[near], xs[near]
    if len(ys) == 0:
        return None
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return len(ys), len(ys) / box, (xs.mean() + 0.5 + shift) % width, ys.mean() + 0.5


def blobs_found(centres: np.ndarray) -> np.ndarray:
    """(..., objects) bool from (..., objects, 2) centres: a blob of the object's colour was found, whatever its
    area and shape (its centre is NaN where none was)."""
    return ~np.isnan(centres[..., 0])


@dataclass
class FrameScores:
    background_accuracy: np.ndarray  # (F,)
    present: np.ndarray  # (F, objects) bool
    shapes: list[list[str | None]]  # per frame, per object: the measured shape class
    spurious: np.ndarray  # (F,)
    centres: np.ndarray  # (F, objects, 2) x, y in pixels; NaN where absent
    classes: np.ndarray  # (F, H, W) palette indices

    @property
    def found(self) -> np.ndarray:
        return blobs_found(self.centres)


def score_frames(frames: np.ndarray, scene: Scene) -> FrameScores:
    """Per-frame scores of (F, H, W, 3) uint8 frames against a parsed prompt."""
    count, height, _, _ = frames.shape
    classes = classify(frames)
    object_ids = [NAMES.index(t.colour) for t in scene.things]
    background_ids = [NAMES.index(f"bg:{scene.background}")]
    if scene.striped:
        background_ids.append(NAMES.index(f"bg:{scene.background}+"))
    named = np.array([COLOURS[i] for i in object_ids + background_ids], dtype=np.float32)
    spurious = (_squared_distances(frames, named).min(-1) > SPURIOUS_DISTANCE ** 2).mean(axis=(1, 2))
    not_object = ~np.isin(classes, object_ids)
    on_background = np.isin(classes, background_ids) & not_object
    background = on_background.sum(axis=(1, 2)) / np.maximum(not_object.sum(axis=(1, 2)), 1)
    present = np.zeros((count, len(scene.things)), dtype=bool)
    centres = np.full((count, len(scene.things), 2), np.nan)
    shapes: list[list[str | None]] = [[None] * len(scene.things) for _ in range(count)]
    reach = 2.0 * SIZE_RANGE[1] * height
    for j, (thing, index) in enumerate(zip(scene.things, object_ids)):
        low, high = _area_range(thing.shape, height)
        for f in range(count):
            blob = _blob(classes[f] == index, reach)
            if blob is None:
                continue
            area, fill, x, y = blob
            centres[f, j] = (x, y)
            shapes[f][j] = shape_of(fill)
            present[f, j] = low <= area <= high and shapes[f][j] == thing.shape
    return FrameScores(background, present, shapes, spurious, centres, classes)


def measured_period(track: np.ndarray, longest: int = 80) -> float | None:
    """The period in frames of a (F, 2) centroid track (NaN = absent), by autocorrelation; None if none.

    The first autocorrelation peak after the first zero crossing, refined by a parabola."""
    valid = ~np.isnan(track).any(1)
    if valid.sum() < 2 * 8:
        return None
    x = np.where(valid[:, None], track - np.nanmean(track, 0), 0.0)
    lags = np.arange(1, min(longest, len(x) // 2) + 1)
    r = np.array([(x[:-lag] * x[lag:]).sum() / max((valid[:-lag] & valid[lag:]).sum(), 1) for lag in lags])
    r0 = (x * x).sum() / valid.sum()
    if r0 <= 1e-6:
        return None  # no motion
    r = r / r0
    below = np.nonzero(r < 0)[0]
    if len(below) == 0:
        return None
    for i in range(below[0] + 1, len(r) - 1):
        if r[i] >= r[i - 1] and r[i] >= r[i + 1] and r[i] > 0.2:
            denominator = r[i - 1] - 2 * r[i] + r[i + 1]
            offset = 0.5 * (r[i - 1] - r[i + 1]) / denominator if denominator != 0 else 0.0
            return float(lags[i] + offset)
    return None


def _mode_classes(classes: np.ndarray) -> np.ndarray:
    """Per-pixel most frequent class over frames (moving objects fall out; the background stays)."""
    flat = classes.reshape(len(classes), -1).astype(np.int64)
    counts = np.zeros((len(NAMES), flat.shape[1]), dtype=np.int32)
    for row in flat:
        counts[row, np.arange(flat.shape[1])] += 1
    return counts.argmax(0)


def stability_losses(first: np.ndarray, now: np.ndarray, scene: Scene) -> dict:
    """Where stability went between two per-pixel class maps (the first window's, a later window's): shares of
    all pixels whose class differs, by what they were and are now. `background_swapped`: the named background
    turned into its other stripe colour (on a striped background, stripes that moved; both colours count as the
    right background); `background_lost`: the named background turned into anything else; `object_moved`: a
    named object's colour turned into anything else; `other`: the rest. They add up to 1 - stability."""
    background = [NAMES.index(f"bg:{scene.background}"), NAMES.index(f"bg:{scene.background}+")]
    changed = now != first
    was_background, is_background = np.isin(first, background), np.isin(now, background)
    was_object = np.isin(first, [NAMES.index(thing.colour) for thing in scene.things])
    return {"background_swapped": float((changed & was_background & is_background).mean()),
            "background_lost": float((changed & was_background & ~is_background).mean()),
            "object_moved": float((changed & was_object).mean()),
            "other": float((changed & ~was_background & ~was_object).mean())}


WORLD_METRICS = ("world_background", "world_objects", "world_spurious", "world_stability")


class WorldTrack:
    """A video's per-frame world scores, added frame by frame; per-window metrics and motion periods."""

    BATCH = 64

    def __init__(self, scene: Scene):
        self.scene = scene
        self.buffer: list[np.ndarray] = []
        self.right: list[bool] = []
        self.present: list[np.ndarray] = []
        self.spurious: list[float] = []
        self.centres: list[np.ndarray] = []
        self.classes: list[np.ndarray] = []  # int8 class maps (the world's videos are small)
        self.first: np.ndarray | None = None

    def add(self, frame: np.ndarray) -> None:
        self.buffer.append(frame)
        if len(self.buffer) >= self.BATCH:
            self.flush()

    def flush(self) -> None:
        """Score the frames still buffered (the per-frame lists then cover every frame added)."""
        if not self.buffer:
            return
        scores = score_frames(np.stack(self.buffer), self.scene)
        self.buffer = []
        self.right += list(scores.background_accuracy >= BACKGROUND_OK)
        self.present += list(scores.present)
        self.spurious += list(scores.spurious)
        self.centres += list(scores.centres)
        self.classes += list(scores.classes.astype(np.int8))

    def window(self, start: int, end: int, first_end: int, losses: bool = False) -> dict:
        """World metrics of frames [start, end): shares of frames, mean spurious area, stability against
        the first window [0, first_end); with `losses`, also where the stability went (stability_losses)."""
        self.flush()
        if self.first is None:
            self.first = _mode_classes(np.stack(self.classes[:first_end]))
        present = np.stack(self.present[start:end])
        now = _mode_classes(np.stack(self.classes[start:end]))
        metrics = {
            "world_background": float(np.mean(self.right[start:end])),
            "world_objects": float(present.mean()),
            "world_objects_each": [float(v) for v in present.mean(0)],
            "world_spurious": float(np.mean(self.spurious[start:end])),
            "world_stability": float((now == self.first).mean()),
        }
        if losses:
            metrics["world_stability_losses"] = stability_losses(self.first, now, self.scene)
        return metrics

    def periods(self) -> list[dict]:
        """Per object: the measured motion period over the whole video against the grammar's (seconds)."""
        self.flush()
        centres = np.stack(self.centres)
        out = []
        for j, thing in enumerate(self.scene.things):
            measured = measured_period(centres[:, j])
            expected = PERIODS[thing.motion]
            out.append({"object": thing.words, "motion": thing.motion,
                        "measured_s": None if measured is None else measured / FPS,
                        "expected_s": None if expected is None else expected / FPS})
        return out


def period_ok(period: dict, tolerance: float = 0.15) -> bool | None:
    """Whether a measured period is within the tolerance of the grammar's; None for motions without one."""
    if period["expected_s"] is None:
        return None
    measured = period["measured_s"]
    return measured is not None and abs(measured - period["expected_s"]) <= tolerance * period["expected_s"]


def score_video(frames: np.ndarray, scene: Scene, window: int = FPS) -> dict:
    """World metrics of (F, H, W, 3) uint8 frames, per window of `window` frames, and motion periods."""
    track = WorldTrack(scene)
    for frame in frames:
        track.add(frame)
    starts = range(0, max(len(frames) - window + 1, 1), window)
    return {"prompt": scene.prompt, "window": window,
            "windows": [track.window(s, min(s + window, len(frames)), window) for s in starts],
            "periods": track.periods()}
