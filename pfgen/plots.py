"""Pillow-only figures (no plotting library needed at runtime), written atomically.

- `plot_head_types`: left the layers x heads grid coloured by head type, right the mean lag profile per type.
- `plot_cache_pyramid`: heads x history frames, coloured by the cache segment each frame is read through.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pfgen.outputs import atomic_output

TYPE_COLORS: dict[str, tuple[int, int, int]] = {
    "anchor": (31, 119, 180),
    "wave": (255, 127, 14),
    "veil": (44, 160, 44),
}
UNKNOWN_COLOR = (150, 150, 150)
BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
MARGIN = 20
LABEL_W = 48  # room left of the grid for layer numbers
TITLE_H = 28  # room above the grid and the plot for titles
LEGEND_ROW = 18
PLOT_W, PLOT_H = 440, 320
PLOT_GAP = 50


def grid_geometry(n_layers: int, n_heads: int) -> tuple[int, int, int]:
    """(x0, y0, cell): pixel origin of the grid and the side of one head's square.

    Cells shrink so that a 30 x 12 model stays near 360 px tall, but never
    below 4 px so each head stays visible.
    """
    cell = int(max(4, min(24, 360 // max(1, n_layers, n_heads))))
    return MARGIN + LABEL_W, MARGIN + TITLE_H, cell


def _image_size(n_layers: int, n_heads: int) -> tuple[int, int, int, int]:
    """(width, height, plot_x0, plot_y0) of the whole figure."""
    x0, y0, cell = grid_geometry(n_layers, n_heads)
    grid_w, grid_h = n_heads * cell, n_layers * cell
    left_h = y0 + grid_h + 24 + LEGEND_ROW * (len(TYPE_COLORS) + 1)
    plot_x0 = x0 + max(grid_w, 120) + PLOT_GAP
    width = plot_x0 + PLOT_W + MARGIN
    height = max(left_h, y0 + PLOT_H) + MARGIN
    return width, height, plot_x0, y0


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _draw_grid(draw: ImageDraw.ImageDraw, types: Sequence[Sequence[str]], n_heads: int) -> None:
    """Coloured squares (row = layer, column = head), axis numbers and a legend with counts."""
    n_layers = len(types)
    x0, y0, cell = grid_geometry(n_layers, n_heads)
    font = _font()
    draw.text((x0, MARGIN), "head types (rows: layers, cols: heads)", fill=INK, font=font)
    for l, row in enumerate(types):
        for h, t in enumerate(row):
            box = (x0 + h * cell, y0 + l * cell, x0 + (h + 1) * cell - 1, y0 + (l + 1) * cell - 1)
            draw.rectangle(box, fill=TYPE_COLORS.get(t, UNKNOWN_COLOR))
    step_l = max(1, math.ceil(12 / cell))  # label every k-th layer so numbers do not overlap
    for l in range(0, n_layers, step_l):
        draw.text((MARGIN, y0 + l * cell), str(l), fill=INK, font=font)
    step_h = max(1, math.ceil(16 / cell))
    for h in range(0, n_heads, step_h):
        draw.text((x0 + h * cell, y0 + n_layers * cell + 2), str(h), fill=INK, font=font)
    flat = [t for row in types for t in row]
    ly = y0 + n_layers * cell + 24
    for i, (name, colour) in enumerate(TYPE_COLORS.items()):
        y = ly + i * LEGEND_ROW
        draw.rectangle((x0, y, x0 + 12, y + 12), fill=colour)
        draw.text((x0 + 18, y), f"{name}: {flat.count(name)}", fill=INK, font=font)


def _mean_profile(values: np.ndarray) -> np.ndarray:
    """A 1-D profile as is; a 2-D stack (heads x lags) averaged over heads, NaN ignored."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 2:
        ok = np.isfinite(arr)
        count = ok.sum(axis=0)
        arr = np.where(count > 0, np.where(ok, arr, 0).sum(axis=0) / np.maximum(count, 1), np.nan)
    return arr.reshape(-1)


def _y_range(profiles: Mapping[str, np.ndarray]) -> tuple[float, float]:
    finite = [v for p in profiles.values() for v in p[np.isfinite(p)]]
    if not finite:
        return 0.0, 1.0
    lo, hi = float(min(finite)), float(max(finite))
    pad = 0.05 * (hi - lo) if hi > lo else 0.5
    return lo - pad, hi + pad


def nice_ticks(lo: float, hi: float, most: int = 6) -> tuple[list[float], int]:
    """Axis ticks inside [lo, hi] at multiples of a round step (1, 2 or 5 x 10^k; at most `most` of them), and
    the decimals that print every tick exactly once: 0.0, 0.5, 1.0 rather than 0.013, 0.26, 0.51."""
    span = hi - lo
    if not (span > 0 and math.isfinite(span)):
        return [lo], 2
    power = 10.0 ** math.floor(math.log10(span / most))
    step = next(power * m for m in (1, 2, 5, 10) if span / (power * m) <= most)
    first = math.ceil(lo / step - 1e-9)
    ticks = [k * step for k in range(first, math.floor(hi / step + 1e-9) + 1)]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return [round(t, decimals) + 0.0 for t in ticks], decimals


def _draw_profiles(draw: ImageDraw.ImageDraw, profiles: Mapping[str, np.ndarray], px: int, py: int) -> None:
    """Axes with ticks, one polyline per type (gaps at NaN), legend top right."""
    font = _font()
    left, top, right, bottom = px + 50, py + 10, px + PLOT_W - 10, py + PLOT_H - 40
    draw.text((px + 50, py - TITLE_H + 8), "mean lag profile per type", fill=INK, font=font)
    draw.line((left, top, left, bottom, right, bottom), fill=INK, width=1)
    n = max([p.size for p in profiles.values()] + [1])
    lo, hi = _y_range(profiles)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (right - left) * (i / (n - 1) if n > 1 else 0.5)
        return x, bottom - (bottom - top) * (v - lo) / (hi - lo)

    ticks, decimals = nice_ticks(lo, hi)
    for v in ticks:
        _, y = xy(0, v)
        draw.line((left - 4, y, left, y), fill=INK)
        draw.text((px + 2, y - 6), f"{v:.{decimals}f}", fill=INK, font=font)
    for i in range(0, n, max(1, math.ceil(n / 9))):
        x, _ = xy(i, lo)
        draw.line((x, bottom, x, bottom + 4), fill=INK)
        draw.text((x - 4, bottom + 6), str(i + 1), fill=INK, font=font)
    draw.text(((left + right) // 2 - 40, bottom + 22), "history lag d (frames)", fill=INK, font=font)
    draw.text((px + 2, py - TITLE_H + 8), "logit", fill=INK, font=font)
    for j, (name, prof) in enumerate(profiles.items()):
        colour = TYPE_COLORS.get(name, UNKNOWN_COLOR)
        points = [xy(i, v) if math.isfinite(v) else None for i, v in enumerate(prof)]
        for a, b in zip(points, points[1:]):
            if a is not None and b is not None:
                draw.line((a, b), fill=colour, width=2)
        for p in points:
            if p is not None:
                draw.ellipse((p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2), fill=colour)
        draw.line((right - 90, top + 8 + 14 * j, right - 70, top + 8 + 14 * j), fill=colour, width=2)
        draw.text((right - 64, top + 2 + 14 * j), name, fill=INK, font=font)


def plot_head_types(types: Sequence[Sequence[str]], lag_profiles_by_type: Mapping[str, np.ndarray],
                    path: str | os.PathLike) -> Path:
    """Write the head-type grid and the per-type mean lag profiles as a PNG at ``path``.

    ``lag_profiles_by_type[t]`` is a mean profile (index i = lag i + 1) or a
    heads x lags stack that is averaged here. The file is written to a temp
    file beside ``path`` and renamed, so a reader never sees half a PNG.
    """
    path = Path(path)
    n_layers = len(types)
    n_heads = max([len(row) for row in types] + [1])
    width, height, px, py = _image_size(n_layers, n_heads)
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    _draw_grid(draw, types, n_heads)
    profiles = {k: _mean_profile(v) for k, v in lag_profiles_by_type.items()}
    _draw_profiles(draw, profiles, px, py)
    save_png(image, path)
    return path


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write to a temp file beside `path` and rename, so a reader never sees half a PNG."""
    path = Path(path)
    with atomic_output(path) as tmp:
        image.save(tmp, format="PNG")
    return path


SEGMENT_COLORS: dict[str, tuple[int, int, int]] = {
    "sink": (214, 39, 40), "recent": (31, 119, 180), "cyclic": (255, 127, 14),
    "stride": (148, 103, 189), "merge": (44, 160, 44),
}


GAP_W = 16  # pixels of the gap marker between the sink and the recent span of `plot_cache_pyramid`


def plot_cache_pyramid(rows: Sequence[tuple[str, Mapping[int, str]]], columns: Sequence[int], path,
                       title: str = "") -> Path:
    """One row per head (label, {frame: segment kind}), one column per frame of `columns` (increasing).

    Where `columns` skips frames (between the sink and the recent span), a hatched gap column marks the
    jump, so the image stays as wide as the columns given whatever the frame numbers are.
    """
    font = _font()
    cell_w = max(2, min(12, 900 // max(1, len(columns))))
    cell_h = max(2, min(12, 720 // max(1, len(rows))))
    x0, y0 = MARGIN + 90, MARGIN + TITLE_H
    xs, x, prev = {}, x0, None
    for t in columns:
        if prev is not None and t != prev + 1:
            x += GAP_W
        xs[t], x, prev = x, x + cell_w, t
    width, bottom = x + MARGIN + 6 * len(str(max(columns, default=0))), y0 + len(rows) * cell_h  # room for a label
    height = bottom + 30 + LEGEND_ROW * len(SEGMENT_COLORS) + MARGIN
    image = Image.new("RGB", (max(width, 420), height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, MARGIN), title or "frames each head reads (rows: heads, cols: frames)", fill=INK, font=font)
    step = max(1, math.ceil(12 / cell_h))
    for r, (label, kinds) in enumerate(rows):
        if r % step == 0:
            draw.text((MARGIN, y0 + r * cell_h), label, fill=INK, font=font)
        for t, kind in kinds.items():
            if t in xs:
                box = (xs[t], y0 + r * cell_h, xs[t] + cell_w - 1, y0 + (r + 1) * cell_h - 1)
                draw.rectangle(box, fill=SEGMENT_COLORS.get(kind, UNKNOWN_COLOR))
    label_every = max(1, math.ceil((6 * len(str(max(columns, default=0))) + 8) / cell_w))
    run_start = 0  # labels count from the start of each run of adjacent frames
    for i, t in enumerate(columns):
        if i > 0 and t != columns[i - 1] + 1:
            run_start = i
            gx = xs[t] - GAP_W
            for k in range(0, bottom - y0, 6):  # hatching: the frames in between are not drawn
                draw.line((gx + 3, y0 + k + 6, gx + GAP_W - 3, y0 + k), fill=UNKNOWN_COLOR)
        if (i - run_start) % label_every == 0:
            draw.text((xs[t], bottom + 2), str(t), fill=INK, font=font)
    ly = bottom + 24
    for i, (name, colour) in enumerate(SEGMENT_COLORS.items()):
        draw.rectangle((x0, ly + i * LEGEND_ROW, x0 + 12, ly + i * LEGEND_ROW + 12), fill=colour)
        draw.text((x0 + 18, ly + i * LEGEND_ROW), name, fill=INK, font=font)
    return save_png(image, path)
