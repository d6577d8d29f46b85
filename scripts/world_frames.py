"""One frame every few seconds of each video, a row per video: the figure of docs/world.md.

    python scripts/world_frames.py runs/eval/videos/pyramid/0[0-5].mp4 --every 6 --count 10 -o docs/world-60s-frames.png

Rows are in the order given; the first frame is on the left; frames are scaled by --scale (nearest pixel
would show the 8x8 VAE blocks; bilinear is what a player shows)."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
from PIL import Image

from pfgen.errors import PfgenError
from pfgen.evaluate.videos import read_video
from pfgen.plots import save_png


def row(path: Path, every_s: float, count: int, scale: float) -> np.ndarray:
    meta, frames = read_video(path)
    step = round(every_s * meta.fps)
    try:  # decode up to the last picked frame only
        picked = [frame for n, frame in enumerate(itertools.islice(frames, (count - 1) * step + 1)) if n % step == 0]
    finally:
        frames.close()
    size = (round(meta.width * scale), round(meta.height * scale))
    return np.concatenate([np.asarray(Image.fromarray(f).resize(size, Image.BILINEAR)) for f in picked], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("videos", type=Path, nargs="+")
    parser.add_argument("--every", type=float, default=6.0, help="seconds between frames")
    parser.add_argument("--count", type=int, default=10, help="frames per row (fewer where a video ends first)")
    parser.add_argument("--scale", type=float, default=1.5)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    try:
        rows = [row(path, args.every, args.count, args.scale) for path in args.videos]
    except PfgenError as exc:
        raise SystemExit(f"error: {exc}") from None
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    save_png(Image.fromarray(np.concatenate(rows, axis=0)), args.output)
    print(f"wrote {args.output}: {len(rows)} rows, {width}x{sum(r.shape[0] for r in rows)} px")


if __name__ == "__main__":
    main()
