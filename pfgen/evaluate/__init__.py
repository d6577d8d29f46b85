"""`pfgen evaluate`: what the cache does to a long video over time, from weight-free metrics.

videos.py (finding, pairing and decoding videos), metrics.py (per-frame features -> per-window metrics and
summaries), deep.py (optional CLIP scores), run.py (end to end), report.py (tables, JSON), plot.py (PNG).
Needs OpenCV (`pip install 'pfgen[evaluate]'`); this module imports nothing heavy, so the CLI can check first.
"""

from __future__ import annotations

from pfgen.errors import PfgenError


def require_opencv() -> None:
    """Fail in one line when the evaluate extra is missing."""
    try:
        import cv2  # noqa: F401
    except ImportError:
        raise PfgenError("pfgen evaluate needs OpenCV", "pip install 'pfgen[evaluate]'") from None
