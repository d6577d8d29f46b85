"""What `pfgen evaluate` prints: a rich table per video (windows x metrics, flagged values marked `!`, then
slope and worst window), a difference table per comparison, or the whole result as one JSON object."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager

from pfgen.evaluate.metrics import THRESHOLDS, UNITS, flagged, threshold_text

DEEP_UNITS = {"clip_text": "cos", "subject_consistency": "cos"}


def to_json(result: dict) -> str:
    return json.dumps(result, indent=2)


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.3g}" if signed else f"{value:.3g}"


def _header(metric: str) -> str:
    return f"{metric}\n[dim]{UNITS.get(metric) or DEEP_UNITS.get(metric, '')}[/]"


def _span(window: dict) -> str:
    return f"{window['start_s']:g}-{window['end_s']:g} s"


def video_table(video: dict, metrics: list[str]):
    from rich.table import Table

    title = (f"{video['label']}: {video['seconds']:.1f} s, {video['width']}x{video['height']}, "
             f"{video['fps']:g} fps")
    table = Table(title=title, title_justify="left")
    table.add_column("window")
    for metric in metrics:
        table.add_column(_header(metric), justify="right")
    windows = video["windows"]
    for i, window in enumerate(windows):
        cells = []
        for metric in metrics:
            value = window.get(metric)
            mark = metric in THRESHOLDS and flagged(metric, value, windows[0].get(metric))
            cells.append(f"[bold red]{_number(value)}![/]" if mark else _number(value))
        table.add_row(_span(window), *cells, end_section=i == len(windows) - 1)
    summary = video["summary"]
    table.add_row("slope/min", *(_number(summary[m]["slope_per_min"], signed=True) for m in metrics))
    table.add_row("worst at", *(f"{summary[m]['worst']['start_s']:g} s" if summary[m]["worst"] else "-"
                                for m in metrics))
    table.add_row("flagged from", *(f"{summary[m]['flagged_from_s']:g} s" if summary[m]["flagged_from_s"]
                                    is not None else "-" for m in metrics))
    return table


def comparison_table(comparison: dict, metrics: list[str]):
    from rich.table import Table

    table = Table(title=f"{comparison['name']}: {comparison['other']} minus {comparison['baseline']}, "
                        f"over {comparison['common_s']:g} s", title_justify="left")
    table.add_column("window")
    for metric in metrics:
        table.add_column(_header(metric), justify="right")
    for window in comparison["windows"]:
        table.add_row(_span(window), *(_number(window[m], signed=True) for m in metrics))
    return table


@contextmanager
def evaluation_progress(console):
    """A transient bar over the videos on the stderr console (off when it is not a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("evaluating {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("", total=None)
        yield lambda done, total, label: bar.update(task, completed=done, total=total, description=label)


def print_report(result: dict) -> None:
    """Every video's table, then every comparison's differences, on stdout (so `> report.txt` keeps them)."""
    from rich.console import Console

    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160)
    metrics = result["metrics"]
    for video in result["videos"]:
        console.print(video_table(video, metrics))
    for comparison in result["comparisons"]:
        console.print(comparison_table(comparison, metrics))
    limits = ", ".join(threshold_text(m) for m in THRESHOLDS)
    console.print(f"! = flagged: {limits} (docs/evaluate.md)",
                  highlight=False, soft_wrap=True)
