"""The world's renderer (torch-free): a scene and a seed -> frames, at any length, deterministically.

Everything random (sizes, centres, phases, directions, stripes) is drawn once from (prompt, seed) and fixed
for the whole video; frame t is then a pure function of t, so any range of frames renders on its own.
Edges are anti-aliased by their signed distance (a one-pixel ramp).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from pfgen.world.grammar import BACKGROUNDS, OBJECT_COLOURS, PERIODS, STRIPE_LIFT, Scene

SIZE_RANGE = (0.09, 0.14)  # radius or half-side, as a share of the frame height
ORBIT_RANGE = (0.20, 0.30)  # circling radius, share of the height
BOUNCE_RANGE = (0.20, 0.30)  # bounce height, share of the height
STRIPE_WIDTH = (8, 16)  # pixels


@dataclass(frozen=True)
class Placed:
    """One object's fixed draw: shape, colour, size and the parameters of its motion."""
    shape: str
    rgb: tuple[int, int, int]
    motion: str
    size: float
    centre: tuple[float, float]  # (x, y) pixels: the orbit's centre, the bounce's floor point, the start
    amplitude: float
    phase: float
    direction: int

    def position(self, t: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Centre (x, y) at video frames t."""
        x0, y0 = self.centre
        period = PERIODS[self.motion]
        if self.motion == "circling":
            angle = self.phase + self.direction * 2 * np.pi * t / period
            return x0 + self.amplitude * np.cos(angle), y0 + self.amplitude * np.sin(angle)
        if self.motion == "bouncing":
            return np.full_like(t, x0), y0 - self.amplitude * np.abs(np.sin(np.pi * t / period + self.phase))
        if self.motion.startswith("sliding"):
            sign = -1 if self.motion.endswith("left") else 1
            return np.mod(x0 + sign * width * t / period, width), np.full_like(t, y0)
        return np.full_like(t, x0), np.full_like(t, y0)


def scene_rng(prompt: str, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}\n{prompt}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def place(scene: Scene, seed: int, height: int, width: int):
    """(objects, stripes) of a scene for a seed; stripes = (angle, width, phase) or None."""
    rng = scene_rng(scene.prompt, seed)
    placed = []
    for thing in scene.things:
        size = rng.uniform(*SIZE_RANGE) * height
        amplitude = 0.0
        if thing.motion == "circling":
            amplitude = rng.uniform(*ORBIT_RANGE) * height
            reach = amplitude + size
            centre = (rng.uniform(reach, width - reach), rng.uniform(min(reach, height / 2), max(height - reach, height / 2)))
        elif thing.motion == "bouncing":
            amplitude = rng.uniform(*BOUNCE_RANGE) * height
            centre = (rng.uniform(size, width - size), rng.uniform(size + amplitude, height - size))
        else:
            centre = (rng.uniform(size, width - size), rng.uniform(size, height - size))
        phase = rng.uniform(0, 2 * np.pi)
        direction = int(rng.choice([-1, 1]))
        placed.append(Placed(thing.shape, OBJECT_COLOURS[thing.colour], thing.motion, size, centre, amplitude,
                             phase, direction))
    stripes = (rng.uniform(0, np.pi), rng.uniform(*STRIPE_WIDTH), rng.uniform(0, 100)) if scene.striped else None
    return placed, stripes


def _coverage(signed_distance: np.ndarray) -> np.ndarray:
    return np.clip(0.5 - signed_distance, 0.0, 1.0)


def _shape_distance(shape: str, dx: np.ndarray, dy: np.ndarray, size: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) to a ball, square or upright equilateral triangle."""
    if shape == "ball":
        return np.hypot(dx, dy) - size
    if shape == "square":
        qx, qy = np.abs(dx) - size, np.abs(dy) - size
        return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)
    # Equilateral triangle of side 2 size, centroid at the origin, apex up (image y grows downwards): the
    # base lies h/3 below the centroid, the apex 2h/3 above it, h = sqrt(3) size. The max of the half-planes'
    # signed distances is exact inside and close outside, which is all a one-pixel ramp needs.
    k = np.sqrt(3.0)
    px, py = np.abs(dx), k * size / 3.0 - dy  # py: height above the base
    slanted = (k * px + py - k * size) / 2.0
    return np.maximum(slanted, -py)


class WorldVideo:
    """Frames of one (prompt, seed) at a size; `frames(start, count)` renders any range."""

    def __init__(self, scene: Scene, seed: int, height: int, width: int):
        self.scene, self.height, self.width = scene, height, width
        self.objects, self.stripes = place(scene, seed, height, width)
        self.yy, self.xx = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
        self.background = self._background()

    def _background(self) -> np.ndarray:
        base = np.array(BACKGROUNDS[self.scene.background], dtype=np.float64)
        image = np.broadcast_to(base, (self.height, self.width, 3)).copy()
        if self.stripes is not None:
            angle, stripe, phase = self.stripes
            u = np.mod(self.xx * np.cos(angle) + self.yy * np.sin(angle) + phase, 2 * stripe)
            # Bright stripes occupy [stripe, 2 stripe) of each period; signed distance to their edges.
            inside = u >= stripe
            distance = np.where(inside, -np.minimum(u - stripe, 2 * stripe - u), np.minimum(u, stripe - u))
            image += _coverage(distance)[..., None] * STRIPE_LIFT
        return np.clip(image, 0, 255)

    def frames(self, start: int, count: int) -> np.ndarray:
        """(count, H, W, 3) uint8 for video frames start .. start + count - 1."""
        t = np.arange(start, start + count, dtype=np.float64)
        out = np.broadcast_to(self.background, (count, self.height, self.width, 3)).copy()
        for obj in self.objects:
            xs, ys = obj.position(t, self.width)
            for i in range(count):
                alpha = np.zeros((self.height, self.width))
                # Sliding objects wrap around: draw the copies one width to each side too.
                for shift in ((-self.width, 0, self.width) if obj.motion.startswith("sliding") else (0,)):
                    d = _shape_distance(obj.shape, self.xx - xs[i] - shift, self.yy - ys[i], obj.size)
                    alpha = np.maximum(alpha, _coverage(d))
                out[i] += alpha[..., None] * (np.array(obj.rgb, dtype=np.float64) - out[i])
        return np.round(out).astype(np.uint8)
