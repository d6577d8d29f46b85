"""Shared pieces of the benchmark scripts: shapes, random models, timers, memory probes, report rows."""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
HEADS = ROOT / "configs" / "heads"


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    heads: int
    head_dim: int
    ffn: int
    text_dim: int
    freq_dim: int
    height: int
    width: int
    chunks: int
    dtype: str
    heads_file: str
    attention_heads: int  # heads of the single layer bench_attention times


SHAPES = {
    # Wan2.1-T2V-1.3B at 480x832 (1560 tokens/frame), 60 s = 80 chunks.
    "full": Shape("full", 30, 12, 128, 8960, 4096, 256, 480, 832, 80, "bfloat16", "self-forcing-1.3b.json", 12),
    # 4 layers of 3 heads x 128 at 240x416 (390 tokens/frame): attention ~70 % of FLOPs like the full model.
    "cpu": Shape("cpu", 4, 3, 128, 2240, 4096, 256, 240, 416, 40, "float32", "bench-cpu-4x3.json", 12),
    # Seconds, to keep the scripts from rotting (tests run it): the embedded world model's architecture
    # (pfgen/world/model.py) and head file, random weights, at 32x48.
    "tiny": Shape("tiny", 6, 4, 32, 384, 64, 64, 32, 48, 12, "float32", "tiny.json", 4),
}


def random_transformer(shape: Shape, device, dtype, seed: int = 0):
    """A Wan transformer of the shape with random weights, cast like from_pretrained(torch_dtype=...)."""
    from diffusers import WanTransformer3DModel

    from pfgen.wan.components import place

    torch.manual_seed(seed)
    with torch.device(device):
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=shape.heads, attention_head_dim=shape.head_dim,
            in_channels=16, out_channels=16, text_dim=shape.text_dim, freq_dim=shape.freq_dim, ffn_dim=shape.ffn,
            num_layers=shape.layers, cross_attn_norm=True, eps=1e-6)
    return place(model, device, dtype)


def attention_layer_types(shape: Shape) -> list[str]:
    """One layer's heads in the shipped proportions (5 wave, 6 anchor, 1 veil of 12), or the tiny mix,
    grouped by type as the pipeline orders them (wan.head_order)."""
    if shape.attention_heads == 12:
        return ["wave"] * 5 + ["anchor"] * 6 + ["veil"]
    return ["wave", "anchor", "anchor", "veil"][: shape.attention_heads]


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class RegionTimer:
    """Accumulates the time spent inside `with timer:` blocks: CUDA events on a GPU (no syncs), clocks on a
    CPU. Pipeline.stream's `timer` hook takes a dict of them: `timer=regions.__getitem__`."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.events: list = []
        self.seconds = 0.0

    def __enter__(self):
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start = time.perf_counter()

    def __exit__(self, *exc):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((self.start, end))
        else:
            self.seconds += time.perf_counter() - self.start

    def take(self) -> float:
        """Seconds accumulated since the last take (call after a sync)."""
        total = self.seconds + sum(a.elapsed_time(b) for a, b in self.events) / 1000.0
        self.events, self.seconds = [], 0.0
        return total


def median(values) -> float:
    return statistics.median(values) if values else float("nan")


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def append_markdown(path: Path, title: str, header: str, row: str) -> None:
    """Append a row to the table under `## title`, creating the section (title, header) when missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = path.read_text().splitlines() if path.exists() else ["# Benchmarks", "",
                                                                   "Rows are appended by the scripts in scripts/."]
    heading = f"## {title}"
    if heading not in lines:
        lines += ["", heading, "", *header.splitlines()]
    end = lines.index(heading) + 1
    while end < len(lines) and not lines[end].startswith("|"):
        end += 1
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines.insert(end, row)
    path.write_text("\n".join(lines) + "\n")


def today() -> str:
    return datetime.date.today().isoformat()
