"""Weight-free video metrics: per-frame features (numpy + OpenCV) folded into per-window values.

`FrameFeatures.add` takes decoded RGB frames one at a time and keeps only small per-frame features (a few
numbers, an 8x8 luma grid and a 16x16 thumbnail), so a long 480x832 video is never held in memory.
`window_metrics` turns them into one dict per window of `window_s` seconds; docs/evaluate.md defines every
metric and the reference it follows.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

METRICS = ("brightness", "color_drift", "flicker", "sharpness", "motion", "repetition")
# Which way is worse, for the summary's worst window: +1 larger, -1 smaller, 0 further from the first window.
WORSE = {"brightness": 0, "color_drift": 1, "flicker": 1, "sharpness": -1, "motion": -1, "repetition": 1}
# A window is flagged when its value crosses these documented thresholds (docs/evaluate.md).
THRESHOLDS = {
    "brightness": 10.0,  # mean luma more than 10 levels (of 255) away from the first window's
    "color_drift": 5.0,  # Lab Frechet distance above 5 (a clearly visible colour shift; 2.3 is one JND)
    "flicker": 2.0,  # mean |second temporal difference| of the 8x8 luma grid above 2 levels
    "sharpness": 0.5,  # Laplacian variance below half the first window's
    "motion": 0.05,  # median optical flow below 0.05 pixels per frame: frozen
    "repetition": 0.95,  # frames correlate above 0.95 with frames of a non-adjacent earlier window: a loop
}
UNITS = {"brightness": "luma", "color_drift": "dE", "flicker": "luma", "sharpness": "x first", "motion": "px/frame",
         "repetition": "corr", "world_background": "share", "world_objects": "share",
         "world_spurious": "share", "world_stability": "share"}

STATS_SIDE = 64  # colour statistics on a frame downscaled to at most this many pixels wide or high
FLOW_SIDE = 256  # optical flow on a gray frame downscaled to at most this side (magnitudes scaled back)
GRID = 8  # flicker: luma averaged over an 8x8 grid of blocks
THUMB = 16  # repetition: 16x16 gray thumbnails
MIN_TAIL = 0.5  # a last, partial window is kept when it holds at least half a window of frames


def flagged(metric: str, value: float | None, first: float | None) -> bool:
    """Whether one window's value crosses its metric's threshold (brightness: its change from the first window)."""
    if value is None:
        return False
    limit, direction = THRESHOLDS[metric], WORSE[metric]
    if direction == 0:
        return first is not None and abs(value - first) > limit
    return value < limit if direction < 0 else value > limit


def threshold_text(metric: str) -> str:
    """`sharpness < 0.5`: the flag rule in words, for the report's legend."""
    limit, direction = THRESHOLDS[metric], WORSE[metric]
    if direction == 0:
        return f"|{metric} - first window| > {limit:g}"
    return f"{metric} {'<' if direction < 0 else '>'} {limit:g}"


def _downscale(image: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    h, w = image.shape[:2]
    scale = min(1.0, side / max(h, w))
    if scale == 1.0:
        return image, 1.0
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), scale


class FrameFeatures:
    """Small per-frame features of one video, added frame by frame in display order."""

    def __init__(self):
        self.luma: list[float] = []
        self.lab_mean: list[np.ndarray] = []  # (3,) per frame
        self.lab_moment: list[np.ndarray] = []  # (3, 3) E[x x^T] per frame
        self.grid: list[np.ndarray] = []  # (GRID, GRID) block luma
        self.laplacian: list[float] = []
        self.flow: list[float] = []  # median |flow| of the pair (t-1, t) in pixels of the frame (nan at t = 0)
        self.thumbs: list[np.ndarray] = []  # (THUMB*THUMB,) zero-mean unit-norm
        self._flow_prev: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.luma)

    def add(self, rgb: np.ndarray) -> None:
        """One (H, W, 3) uint8 RGB frame."""
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)  # BT.601 luma
        self.luma.append(float(gray.mean()))
        small, _ = _downscale(rgb, STATS_SIDE)
        lab = cv2.cvtColor(small.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab).reshape(-1, 3).astype(np.float64)
        self.lab_mean.append(lab.mean(0))
        self.lab_moment.append(lab.T @ lab / len(lab))
        self.grid.append(cv2.resize(gray, (GRID, GRID), interpolation=cv2.INTER_AREA).astype(np.float32)
                         if min(gray.shape) >= GRID else np.full((GRID, GRID), gray.mean(), np.float32))
        self.laplacian.append(float(cv2.Laplacian(gray, cv2.CV_32F).var()))
        self._add_flow(gray)
        thumb = cv2.resize(gray, (THUMB, THUMB), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
        thumb -= thumb.mean()
        norm = float(np.linalg.norm(thumb))
        self.thumbs.append(thumb / norm if norm > 1e-3 else thumb * 0.0)

    def _add_flow(self, gray: np.ndarray) -> None:
        small, scale = _downscale(gray, FLOW_SIDE)
        value = math.nan
        if self._flow_prev is not None:
            flow = cv2.calcOpticalFlowFarneback(self._flow_prev, small, None, 0.5, 3, 15, 3, 5, 1.2, 0)
            value = float(np.median(np.hypot(flow[..., 0], flow[..., 1]))) / scale
        self.flow.append(value)
        self._flow_prev = small


def window_bounds(frames: int, fps: float, window_s: float) -> list[tuple[int, int]]:
    """[start, end) frame ranges of the windows; a partial last window is kept if at least MIN_TAIL full."""
    size = max(1, round(window_s * fps))
    bounds = [(s, min(s + size, frames)) for s in range(0, frames, size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < MIN_TAIL * size:
        bounds.pop()
    return bounds


def _frechet(mean0: np.ndarray, cov0: np.ndarray, mean1: np.ndarray, cov1: np.ndarray) -> float:
    """Frechet (2-Wasserstein) distance between two Gaussians, in the units of the data (Lab: ~ Delta E)."""
    def sqrtm(c):
        values, vectors = np.linalg.eigh(c)
        return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T

    root0 = sqrtm(cov0)
    cross = np.linalg.eigvalsh(root0 @ cov1 @ root0)
    trace = np.trace(cov0) + np.trace(cov1) - 2 * np.sqrt(np.clip(cross, 0, None)).sum()
    return float(math.sqrt(max(0.0, float(np.sum((mean0 - mean1) ** 2)) + trace)))


def _flicker_per_frame(grid: np.ndarray) -> np.ndarray:
    """Mean |g[t+1] - 2 g[t] + g[t-1]| over the blocks, for frame t (nan for the first and last frame)."""
    out = np.full(len(grid), np.nan)
    if len(grid) >= 3:
        out[1:-1] = np.abs(grid[2:] - 2 * grid[1:-1] + grid[:-2]).mean(axis=(1, 2))
    return out


def _repetition(thumbs: np.ndarray, bounds: list[tuple[int, int]]) -> list[float | None]:
    """Per window: median over its frames of the best correlation with a frame two or more windows back."""
    out: list[float | None] = []
    for i, (start, end) in enumerate(bounds):
        if i < 2:
            out.append(None)
            continue
        earlier = thumbs[:bounds[i - 1][0]]
        best = (thumbs[start:end] @ earlier.T).max(axis=1)
        out.append(float(np.median(best)))
    return out


def _nanmedian(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)]
    return float(np.median(values)) if len(values) else None


def _nanmean(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else None


def window_metrics(features: FrameFeatures, fps: float, window_s: float) -> list[dict]:
    """One dict per window: `start_s`, `end_s`, `frames` and every metric of METRICS (None where undefined)."""
    n = len(features)
    if n == 0:
        return []
    bounds = window_bounds(n, fps, window_s)
    luma = np.asarray(features.luma)
    lab_mean, lab_moment = np.stack(features.lab_mean), np.stack(features.lab_moment)
    flicker = _flicker_per_frame(np.stack(features.grid))
    laplacian = np.asarray(features.laplacian)
    flow = np.asarray(features.flow)
    repetition = _repetition(np.stack(features.thumbs), bounds)
    windows, colour0, sharp0 = [], None, None
    for i, (start, end) in enumerate(bounds):
        mean = lab_mean[start:end].mean(0)
        cov = lab_moment[start:end].mean(0) - np.outer(mean, mean)
        colour0 = colour0 or (mean, cov)
        sharp = float(laplacian[start:end].mean())
        sharp0 = sharp0 if sharp0 is not None else sharp
        windows.append({
            "start_s": start / fps, "end_s": end / fps, "frames": end - start,
            "brightness": float(luma[start:end].mean()),
            "color_drift": _frechet(*colour0, mean, cov) if i else 0.0,
            "flicker": _nanmean(flicker[start:end]),
            "sharpness": sharp / sharp0 if sharp0 > 0 else None,
            "motion": _nanmedian(flow[start:end]),
            "repetition": repetition[i],
        })
    return windows


def summarize(windows: list[dict], worse: dict[str, int] = WORSE) -> dict:
    """Per metric of `worse`: first and last window's value, least-squares slope per minute, worst window (by
    the metric's direction in `worse`), start of the first flagged window."""
    summary = {}
    for metric, direction in worse.items():
        points = [(w["start_s"], w[metric]) for w in windows if w.get(metric) is not None]
        if not points:
            summary[metric] = {"first": None, "last": None, "slope_per_min": None, "worst": None,
                               "flagged_from_s": None}
            continue
        times, values = np.array([p[0] for p in points]) / 60.0, np.array([p[1] for p in points])
        slope = float(np.polyfit(times, values, 1)[0]) if len(points) >= 2 else None
        first = windows[0].get(metric)
        badness = np.abs(values - values[0]) if direction == 0 else direction * values
        worst = int(np.argmax(badness))
        flags = [w["start_s"] for w in windows if metric in THRESHOLDS and flagged(metric, w.get(metric), first)]
        summary[metric] = {"first": float(values[0]), "last": float(values[-1]), "slope_per_min": slope,
                           "worst": {"start_s": float(points[worst][0]), "value": float(values[worst])},
                           "flagged_from_s": flags[0] if flags else None}
    return summary
