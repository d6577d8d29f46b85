"""`--plot`: one PNG, one subplot per metric over time, one line per video (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path

from pfgen.errors import PfgenError
from pfgen.evaluate.metrics import THRESHOLDS, UNITS, WORSE
from pfgen.outputs import atomic_output


def require_matplotlib() -> None:
    """Fail before any decoding when the plot extra is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PfgenError("--plot needs matplotlib", "pip install 'pfgen[plot]'") from None


def plot_metrics(result: dict, path: Path, title: str | None = None) -> None:
    """Each metric's per-window values at the windows' middles; flag thresholds as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = result["metrics"]
    cols = 3
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.9 * rows), squeeze=False)
    end = max((w["end_s"] for v in result["videos"] for w in v["windows"]), default=1.0)
    try:
        for ax, metric in zip(axes.flat, metrics):
            ax.set_xlim(0, end)
            for video in result["videos"]:
                points = [((w["start_s"] + w["end_s"]) / 2, w[metric]) for w in video["windows"]
                          if w.get(metric) is not None]
                if points:
                    ax.plot(*zip(*points), marker="o", markersize=3, label=video["label"])
            if metric in THRESHOLDS and WORSE[metric] != 0:
                ax.axhline(THRESHOLDS[metric], color="grey", linestyle="--", linewidth=0.8)
            unit = UNITS.get(metric)
            ax.set_title(f"{metric} ({unit})" if unit else metric, fontsize=10)
            ax.set_xlabel("time (s)", fontsize=8)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(metrics):]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=8,
                   frameon=False)
        fig.suptitle(title or f"pfgen evaluate: {result['window_s']:g} s windows (dashed: flag threshold)",
                     fontsize=11)
        legend_rows = math.ceil(len(labels) / 4)
        fig.tight_layout(rect=(0, 0.04 * legend_rows + 0.02, 1, 1))
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
    finally:
        plt.close(fig)
