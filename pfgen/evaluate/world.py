"""World metrics in `pfgen evaluate`: for a video whose prompt (manifest or pfgen's mp4 metadata) is a sentence
of the world grammar, the world scorer's per-window shares and the objects' motion periods."""

from __future__ import annotations

from pfgen.world.grammar import Scene, parse
from pfgen.world.score import WORLD_METRICS, WorldTrack

# Which way is worse (as metrics.WORSE): fewer frames right, more spurious area, less stable background.
WORLD_WORSE = {"world_background": -1, "world_objects": -1, "world_spurious": 1, "world_stability": -1}
assert tuple(WORLD_WORSE) == WORLD_METRICS


def world_scene(prompt: str | None) -> Scene | None:
    return parse(prompt) if prompt else None


def add_world_windows(windows: list[dict], track: WorldTrack, fps: float) -> dict:
    """Adds the world metrics to every window; returns the video's `world` entry (prompt, periods)."""
    first_end = round(windows[0]["end_s"] * fps) if windows else 0
    for window in windows:
        start, end = round(window["start_s"] * fps), round(window["end_s"] * fps)
        window.update(track.window(start, end, first_end))
    return {"prompt": track.scene.prompt, "periods": track.periods()}
