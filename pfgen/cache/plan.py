"""The ragged layout of one chunk, built once and shared by its 5 passes and all layers.

For each head type the plan says where the chunk's frames are written, which stored tokens each query
frame reads (as a slice when they are contiguous, which is the steady state, else an index tensor), and
which query frames can share one batched attention call. RoPE tables for the chunk are built here too.

Kernels that walk each query frame's key set themselves (the `triton` backend) read `RulePlan.segments`,
the same reads as runs of tokens: one small int32 table per chunk, so that no pass plans anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pfgen.cache.policy import Finalize, Read, Rule
from pfgen.rope import frame_table, rope_table


@dataclass(frozen=True)
class HistRead:
    """The hist part of a group: one partition per query frame (`per_frame`) or one shared partition."""

    partitions: slice
    per_frame: bool
    keys: slice | torch.Tensor
    q_table: torch.Tensor  # complex rotations of queries at min(t_q, window): (F_g*N, 1, D/2)


@dataclass(frozen=True)
class Group:
    """Query frames [first, stop) of the chunk that read the same slots: one batched call."""

    first: int
    stop: int
    abs_keys: slice | torch.Tensor
    hist: HistRead | None


ABS, HIST = 0, 1  # segment regions


@dataclass(frozen=True)
class RulePlan:
    write_slots: tuple[int, ...]
    groups: tuple[Group, ...]
    reads: tuple[Read, ...]
    ops: tuple
    segments: torch.Tensor  # (F, S, 4) int32: region, hist partition, first token, tokens (0: padding)
    hist_table: torch.Tensor | None  # rotations of all F*N queries at min(t_q, window), if any frame reads hist


@dataclass(frozen=True)
class ChunkPlan:
    t0: int
    frames: int
    tables: dict  # commit tables: "hist" and ("block", m)
    rules: dict[str, RulePlan]


def token_runs(slots, offsets) -> list[list[int]]:
    """[start, stop) token runs of `slots` in a region whose slot i spans offsets[i]:offsets[i+1]."""
    runs: list[list[int]] = []
    for s in slots:
        if runs and runs[-1][1] == offsets[s]:
            runs[-1][1] = offsets[s + 1]
        else:
            runs.append([offsets[s], offsets[s + 1]])
    return runs


def selection(slots, offsets, device) -> slice | torch.Tensor:
    """Token selection for `slots` of a region whose slot i spans offsets[i]:offsets[i+1]."""
    runs = token_runs(slots, offsets)
    if len(runs) == 1:
        return slice(*runs[0])
    if not runs:
        return slice(0, 0)
    return torch.cat([torch.arange(a, b) for a, b in runs]).to(device)


def _groups(reads: list[Read], abs_offsets, hist_offsets, query_tables, device) -> tuple[Group, ...]:
    spans: list[list[int]] = []
    for f in range(len(reads)):
        if spans and _fits(reads[spans[-1][0]:f + 1]):
            spans[-1][1] = f + 1
        else:
            spans.append([f, f + 1])
    return tuple(_group(reads, a, b, abs_offsets, hist_offsets, query_tables, device) for a, b in spans)


def _fits(run: list[Read]) -> bool:
    """Query frames can share a call when they read the same slots, from one partition or from
    consecutive partitions (one per frame, a free view of the hist region)."""
    first = run[0]
    if any(r.abs_slots != first.abs_slots or r.hist_slots != first.hist_slots for r in run):
        return False
    parts = [r.hist_partition for r in run]
    return not first.hist_slots or len(set(parts)) == 1 or parts == list(range(parts[0], parts[0] + len(run)))


def _group(reads, a, b, abs_offsets, hist_offsets, query_tables, device) -> Group:
    read = reads[a]
    hist = None
    if read.hist_slots:
        parts = [r.hist_partition for r in reads[a:b]]
        per_frame = b - a > 1 and parts[1] != parts[0]
        partitions = slice(parts[0], parts[-1] + 1) if per_frame else slice(parts[0], parts[0] + 1)
        table = query_tables(tuple(r.hist_shift for r in reads[a:b]), a)
        hist = HistRead(partitions, per_frame, selection(read.hist_slots, hist_offsets, device), table)
    return Group(a, b, selection(read.abs_slots, abs_offsets, device), hist)


def build_plan(rules: dict[str, Rule], t0: int, frames: int, grid: tuple[int, int], head_dim: int,
               theta: float, abs_offsets: dict[str, list[int]], device) -> ChunkPlan:
    """Advance every rule by one chunk and describe the chunk's reads, writes and commits."""
    h, w = grid
    n = h * w
    cache: dict = {}

    def query_tables(shifts, first):
        key = (shifts, first)
        if key not in cache:
            positions = [t0 + first + i - s for i, s in enumerate(shifts)]
            cache[key] = frame_table(positions, h, w, head_dim, theta, device)
        return cache[key]

    plans = {}
    blocks = set()
    for name, rule in rules.items():
        write = rule.begin_chunk(t0, frames)
        reads = rule.reads(t0, frames)
        ops = tuple(rule.commit(t0, frames))
        hist_offsets = [i * n for i in range(rule.layout.hist_slots + 1)]
        groups = _groups(reads, abs_offsets[name], hist_offsets, query_tables, device)
        hist_table = None
        if any(r.hist_slots for r in reads):
            hist_table = query_tables(tuple(r.hist_shift for r in reads), 0)
        segments = _segments(reads, abs_offsets[name], hist_offsets, device)
        plans[name] = RulePlan(write, groups, tuple(reads), ops, segments, hist_table)
        blocks |= {(op.block, rule.layout.merge_patch, rule.layout.merge_block)
                   for op in ops if isinstance(op, Finalize)}
    tables = {"hist": frame_table([0], h, w, head_dim, theta, device)}
    for m, patch, size in blocks:
        tables[("block", m)] = _block_table(m, patch, size, grid, head_dim, theta, device)
    return ChunkPlan(t0, frames, tables, plans)


def _segments(reads: list[Read], abs_offsets, hist_offsets, device) -> torch.Tensor:
    """Each query frame's key set as token runs: abs runs (queries at t_q), then hist runs (queries at
    min(t_q, window)) of the frame's partition. Padded with empty runs to the longest list."""
    rows = []
    for r in reads:
        row = [(ABS, 0, a, b - a) for a, b in token_runs(r.abs_slots, abs_offsets)]
        row += [(HIST, r.hist_partition, a, b - a) for a, b in token_runs(r.hist_slots, hist_offsets)]
        rows.append(row)
    width = max(1, max(len(row) for row in rows))
    table = torch.zeros(len(rows), width, 4, dtype=torch.int32)
    for f, row in enumerate(rows):
        if row:
            table[f, :len(row)] = torch.tensor(row, dtype=torch.int32)
    return table.to(device)


def _block_table(m: int, patch: int, size: int, grid, head_dim, theta, device):
    """Merged block m sits at temporal m * size + 1 and at the top-left corner of each patch."""
    h, w = grid
    hp, wp = -(-h // patch), -(-w // patch)
    ys = (torch.arange(hp) * patch).repeat_interleave(wp)
    xs = (torch.arange(wp) * patch).repeat(hp)
    ts = torch.full_like(ys, m * size + 1)
    return rope_table(ts, ys, xs, head_dim, theta, device)
