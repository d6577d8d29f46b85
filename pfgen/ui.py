"""Terminal rendering with rich: the chunk progress bar, the inspect-cache tables, and keeping the libraries' own
bars and logs out of pfgen's output."""

from __future__ import annotations

import time
from contextlib import contextmanager

from pfgen.timeline import video_frame
from pfgen.words import count, format_bytes


PLAIN_PROGRESS_EVERY_S = 10.0  # a non-terminal (CI log, `| tee`) gets a plain line this often, not a bar


@contextmanager
def chunk_progress(console, fps: int):
    """Progress over chunks: video seconds done, generation fps (video frames per wall second), ETA. The bar and
    the ETA count DiT passes, so a first chunk with more steps (Causal Forcing++) does not skew them. On a
    terminal a live bar; elsewhere a plain line after the first chunk, every PLAIN_PROGRESS_EVERY_S seconds
    and after the last, since a bar there is cut at the log's width."""
    start = time.perf_counter()
    if not console.is_terminal:
        yield _plain_progress(console, fps, start)
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("generating"), BarColumn(), TextColumn("chunk {task.fields[done]}/{task.fields[chunks]}"),
               TextColumn("{task.fields[video]:.1f}/{task.fields[video_total]:.1f} s video"),
               TextColumn("{task.fields[fps]:.1f} fps"), TimeRemainingColumn(), TextColumn("{task.fields[prompt]}"))
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("generate", total=None, done=0, chunks="?", video=0.0, video_total=0.0, fps=0.0, prompt="")
        switches = [0]

        def on_chunk(chunk, total_chunks):
            if chunk.switch is not None:
                switches[0] += 1
                s = chunk.switch
                if switches[0] > 1 or s["video_frame"]:  # a one-prompt video has nothing to report
                    progress.update(task, prompt=f"prompt {switches[0]} since {s['seconds']:.2f} s "
                                                 f"(frame {s['video_frame']})")
            done = _chunk_status(chunk, total_chunks, fps, start)
            progress.update(task, completed=chunk.passes, total=chunk.passes_total, done=chunk.index + 1,
                            chunks=total_chunks, **done)

        yield on_chunk


def _chunk_status(chunk, total_chunks: int, fps: int, start: float) -> dict:
    per_chunk = chunk.latents.shape[2]
    frames_done = video_frame(chunk.t0 + per_chunk, chunk.start)
    frames_total = video_frame(chunk.start + total_chunks * per_chunk, chunk.start)
    return {"video": frames_done / fps, "video_total": frames_total / fps,
            "fps": frames_done / (time.perf_counter() - start)}


def _plain_progress(console, fps: int, start: float):
    last = [None]

    def on_chunk(chunk, total_chunks):
        now, done = time.perf_counter(), chunk.index + 1
        if last[0] is not None and done < total_chunks and now - last[0] < PLAIN_PROGRESS_EVERY_S:
            return
        last[0] = now
        status = _chunk_status(chunk, total_chunks, fps, start)
        eta = (now - start) / chunk.passes * (chunk.passes_total - chunk.passes)  # passes: first chunks may take more
        console.print(f"generating: chunk {done}/{total_chunks}, {status['video']:.1f}/{status['video_total']:.1f} s "
                      f"of video, {status['fps']:.1f} fps, {eta:.0f} s left", highlight=False, markup=False,
                      soft_wrap=True)

    return on_chunk


def print_cache_report(console, report: dict) -> None:
    """One table per head type (segments, frames, tokens, K/V bytes) and totals against the baseline."""
    from rich.table import Table

    summary = report["summary"]
    console.print(f"query frame {report['frame']} (chunk {report['chunk']}), {report['tokens_per_frame']} tokens "
                  f"per frame")
    seen = {}
    for head in report["heads"]:
        seen.setdefault(head["type"], head)
    for kind, head in seen.items():
        count = summary["heads_per_type"][kind]
        table = Table(title=f"{kind} x{count}: reads {head['tokens']} tokens, stores "
                            f"{format_bytes(summary['kv_bytes_per_head'][kind])}/head", title_justify="left")
        for col in ("segment", "frames", "RoPE t", "tokens"):
            table.add_column(col)
        for seg in head["segments"]:
            table.add_row(seg["kind"], _frames(seg["frames"]), _frames(seg["rope_t"]), str(seg["tokens"]))
        console.print(table)
    mean, base = summary["tokens_per_head_mean"], summary["baseline_tokens_per_head"]
    console.print(f"keys read per head: {mean:,.0f} mean vs {base:,} for the rolling-21 baseline "
                  f"({mean / base:.1%})")
    kv, kv0 = summary["kv_bytes"], summary["baseline_kv_bytes"]
    console.print(f"K/V stored: {format_bytes(kv)} vs {format_bytes(kv0)} for rolling-21 ({kv / kv0:.1%})")


def _frames(values: list[int]) -> str:
    if len(values) > 8:
        return f"{values[0]}..{values[-1]} ({len(values)})"
    return ", ".join(str(v) for v in values)


class CalibrationProgress:
    """Two bars, prompts done and chunks of the current prompt, shown from `start` on (after the inputs
    are checked and the model is loaded, so an error is never printed under a half-drawn bar)."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console)
        self.prompts = self.progress.add_task("prompts", total=None)
        self.chunks = self.progress.add_task("chunks", total=None)
        self.started = False

    def start(self, prompts: int, chunks: int) -> None:
        self.progress.update(self.prompts, total=prompts)
        self.progress.update(self.chunks, total=chunks)
        self.progress.start()
        self.started = True

    def note(self, text: str) -> None:
        self.progress.console.print(f"[yellow]note:[/] {text}")

    def chunk(self, chunk) -> None:
        self.progress.update(self.chunks, completed=chunk.index + 1)

    def prompt(self, index: int) -> None:
        self.progress.update(self.prompts, completed=index + 1)
        self.progress.update(self.chunks, completed=0)


@contextmanager
def calibration_progress(console):
    reporter = CalibrationProgress(console)
    try:
        yield reporter
    finally:
        if reporter.started:
            reporter.progress.stop()


def print_head_counts(console, heads) -> None:
    """Counts per type per layer, and totals."""
    from rich.table import Table

    table = Table(title=f"head types ({count(heads.layers, 'layer')} x {count(heads.heads, 'head')})",
                  title_justify="left")
    for col in ("layer", "anchor", "wave", "veil"):
        table.add_column(col, justify="right")
    for layer, row in enumerate(heads.types):
        table.add_row(str(layer), *(str(row.count(k)) for k in ("anchor", "wave", "veil")))
    totals = heads.counts()
    table.add_row("all", *(str(totals[k]) for k in ("anchor", "wave", "veil")))
    console.print(table)


def print_agreement(console, report: dict, reference) -> None:
    """Overall agreement, per-type recall/precision of the new labels and the confusion matrix against the
    reference file (`agreement(reference, new)`)."""
    from rich.table import Table

    console.print(f"agreement with {reference}: {report['agreement']:.1%} of {count(report['n'], 'head')}")
    table = Table(title=f"confusion (rows: {reference}, the reference; columns: the new labels)",
                  title_justify="left")
    table.add_column("")
    for name in report["order"]:
        table.add_column(name, justify="right")
    table.add_column("recall", justify="right")
    table.add_column("precision", justify="right")
    for name, row in zip(report["order"], report["confusion"]):
        per = report["per_type"][name]
        table.add_row(name, *(str(v) for v in row), _pct(per.get("recall")), _pct(per.get("precision")))
    console.print(table)


def _pct(value) -> str:
    return "-" if value is None else f"{value:.0%}"


@contextmanager
def hub_output(verbose: bool):
    """huggingface_hub logs every retry of an unreachable Hub (11 lines over 25 s); pfgen prints the one line
    of the final failure instead, and the retries only with --verbose. Download bars stay."""
    if verbose:
        yield
        return
    from huggingface_hub.utils import logging as hub_logging

    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(level)


@contextmanager
def library_output(verbose: bool):
    """transformers / diffusers print weight-loading bars and advice; pfgen keeps them out unless --verbose."""
    if verbose:
        yield
        return
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    levels = transformers_logging.get_verbosity(), diffusers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    hub_utils.enable_progress_bars()  # downloads keep their bars (transformers' switch turns them off too)
    try:
        with hub_output(verbose):
            yield
    finally:
        transformers_logging.set_verbosity(levels[0])
        diffusers_logging.set_verbosity(levels[1])
        transformers_logging.enable_progress_bar()
        diffusers_logging.enable_progress_bar()
