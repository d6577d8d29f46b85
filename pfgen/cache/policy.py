"""Cache rules: which earlier frames a query frame reads, where they are stored, at which RoPE position.

Torch-free, so that `inspect-cache` and the tests can enumerate plans without a model. One `Rule` instance
tracks the state shared by every head of one type (all heads of a type read the same layout), and speaks
in slots of two memory regions that `cache.store` allocates per (layer, type):

- region "abs": keys rotated at their own absolute position (recent frames, current chunk, merged blocks,
  and everything for the `rolling` / `full` baselines);
- region "hist": keys rotated at temporal position 0, read as if placed at sigma(t_q) = max(0, t_q - W).
  It has `partitions` (one per wave phase) so that the query frames of a chunk read adjacent partitions.

Containers are FIFOs filled from their first slot, so what a chunk reads is almost always one contiguous
run of slots (a free view in the attention backends). docs/design.md section 2 is the specification.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_PERIOD = 32  # each wave phase keeps its own bucket and sink copy: memory grows with the period


@dataclass(frozen=True)
class Segment:
    """Part of a query frame's key set, as `inspect-cache` shows it."""

    kind: str
    frames: tuple[int, ...]  # source frames (for merge: every frame averaged into the blocks)
    rope_t: tuple[int, ...]  # temporal RoPE position of each stored item (frame or block)
    blocks: tuple[int, ...] = ()  # merge only: block indices m


@dataclass(frozen=True)
class Read:
    """Slots one query frame reads: abs slots at own positions, hist slots at `hist_shift`."""

    abs_slots: tuple[int, ...]
    hist_partition: int
    hist_slots: tuple[int, ...]
    hist_shift: int  # sigma(t_q): temporal position given to hist keys
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class WriteHist:
    """Commit: store frame `frame` (rotated at temporal 0) into `slot` of each partition."""

    frame: int
    partitions: tuple[int, ...]
    slot: int


@dataclass(frozen=True)
class Shift:
    """Commit: drop the oldest item of a full FIFO (slots start..stop-1 move down by one)."""

    region: str
    partition: int
    start: int
    stop: int


@dataclass(frozen=True)
class Accumulate:
    """Commit: add frame `frame`'s raw K/V, pooled per patch, to the merge accumulator."""

    frame: int


@dataclass(frozen=True)
class Finalize:
    """Commit: the accumulator becomes merged block `block` in abs `slot`; the accumulator restarts."""

    block: int
    slot: int


@dataclass(frozen=True)
class Layout:
    """Slot kinds of the abs region, and the shape of the hist region."""

    abs_frames: int  # the abs region: this many frame slots, then `abs_blocks` merged-block slots
    abs_blocks: int = 0
    hist_partitions: int = 1
    hist_slots: int = 0
    merge_block: int = 0  # frames per merged block (0: no merging)
    merge_patch: int = 1
    hist_in_abs: bool = False  # the hist region is the first `hist_slots` abs slots (no storage of its own)

    def abs_tokens(self, frame_tokens: int, block_tokens: int) -> int:
        """Tokens of the abs region, in closed form (a `full` cache of 4e9 frames is one multiplication)."""
        return self.abs_frames * frame_tokens + self.abs_blocks * block_tokens


class Rule:
    """Base: the state machine of one head type over a video."""

    name = "rule"
    layout: Layout

    def reset(self) -> None:
        raise NotImplementedError

    def begin_chunk(self, t0: int, frames: int) -> tuple[int, ...]:
        """Place the chunk's frames; return the abs slot of each (written by every pass)."""
        raise NotImplementedError

    def reads(self, t0: int, frames: int) -> list[Read]:
        """What each query frame of the chunk reads (identical for all 5 passes)."""
        raise NotImplementedError

    def commit(self, t0: int, frames: int) -> list:
        """Advance history with the chunk's committed frames; return the store operations."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The bookkeeping as plain JSON data (saved states, `pfgen.state`)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def held_frames(self) -> set[int]:
        """Committed frames behind any stored item (re-cache re-encodes exactly these)."""
        raise NotImplementedError

    def window_recache(self, end: int) -> tuple[bool, int]:
        """`recache: window` before the chunk at `end`: (restart, first). Frames first..end-1 are re-encoded in one
        clean pass under the new prompt, each reading all of them; `restart` empties the cache first (the sink is
        redone too), otherwise the stored sink keeps its K/V. See docs/story.md. Only windowed caches define it
        (config.validate refuses it for pyramid)."""
        raise NotImplementedError


class FullRule(Rule):
    """Every head sees all history at its own position (memory grows: the equivalence oracle)."""

    name = "full"

    def __init__(self, max_frames: int):
        self.layout = Layout(abs_frames=max_frames)
        self.max_frames = max_frames
        self.reset()

    def reset(self) -> None:
        self.end = 0

    def begin_chunk(self, t0, frames):
        if t0 + frames > self.max_frames:
            raise ValueError(f"full cache holds {self.max_frames} frames, chunk ends at {t0 + frames}")
        self.end = t0 + frames
        return tuple(range(t0, t0 + frames))

    def reads(self, t0, frames):
        seen = tuple(range(t0 + frames))
        seg = Segment("recent", seen, seen)
        return [Read(seen, 0, (), 0, (seg,)) for _ in range(frames)]

    def commit(self, t0, frames):
        return []

    def state_dict(self):
        return {"end": self.end}

    def load_state_dict(self, state):
        self.end = int(state["end"])

    def held_frames(self):
        return set(range(self.end))

    def window_recache(self, end):
        return True, 0  # the window is the whole video: every frame, sink included


class RollingRule(Rule):
    """Uniform window of `window` frames ending with the current chunk; the first `sink` stay pinned.

    `relative` (LongLive's `use_infinite_attention`): positions are slots in the window, sink first, so once the
    window has rolled by `shift` = end - window frames, the sink is read `shift` frames later than where it was
    stored (through the hist read, whose region is the sink's abs slots); every other distance is unchanged.
    """

    name = "rolling"

    def __init__(self, window: int, sink: int, frames_per_chunk: int, relative: bool = False):
        if window - sink < frames_per_chunk:
            raise ValueError(
                f"rolling window {window} with sink {sink} leaves no room for a {frames_per_chunk}-frame chunk"
            )
        self.window, self.sink, self.relative = window, sink, relative
        hist = sink if relative else 0
        self.layout = Layout(abs_frames=window, hist_slots=hist, hist_in_abs=relative)
        self.reset()

    def reset(self) -> None:
        self.slots: dict[int, int] = {}  # slot -> frame

    def _slot(self, t: int) -> int:
        return t if t < self.sink else self.sink + (t - self.sink) % (self.window - self.sink)

    def begin_chunk(self, t0, frames):
        placed = tuple(self._slot(t) for t in range(t0, t0 + frames))
        for t, s in zip(range(t0, t0 + frames), placed):
            self.slots[s] = t
        return placed

    def reads(self, t0, frames):
        pinned = tuple(sorted(t for t in self.slots.values() if t < self.sink and t < t0))
        rolling = tuple(sorted(t for t in self.slots.values() if t not in pinned))
        shift = max(0, t0 + frames - self.window) if self.relative else 0
        if shift and pinned:  # the sink, stored at its own positions, read `shift` frames later
            abs_slots = tuple(sorted(self._slot(t) for t in rolling))
            hist_slots = tuple(self._slot(t) for t in pinned)
            sink = Segment("sink", pinned, tuple(t + shift for t in pinned))
        else:
            abs_slots, hist_slots = tuple(sorted(self.slots)), ()
            sink = Segment("sink", pinned, pinned)
        segs = tuple(s for s in (sink, Segment("recent", rolling, rolling)) if s.frames)
        return [Read(abs_slots, 0, hist_slots, shift if hist_slots else 0, segs) for _ in range(frames)]

    def commit(self, t0, frames):
        return []

    def state_dict(self):
        return {"slots": [[s, t] for s, t in sorted(self.slots.items())]}

    def load_state_dict(self, state):
        self.slots = {int(s): int(t) for s, t in state["slots"]}

    def held_frames(self):
        return set(self.slots.values())

    def window_recache(self, end):
        return (True, 0) if end <= self.window else (False, end - (self.window - self.sink))


@dataclass
class _Fifo:
    """Items in slots first..first+capacity-1, oldest first."""

    first: int
    capacity: int
    items: list = field(default_factory=list)

    def push(self, item) -> tuple[bool, int]:
        """Append; returns (had to shift, slot written)."""
        full = len(self.items) == self.capacity
        if full:
            self.items.pop(0)
        self.items.append(item)
        return full, self.first + len(self.items) - 1


class PyramidRule(Rule):
    """anchor / wave / veil: sink + a middle container + the recent window (docs/design.md section 2).

    middle = "stride" (anchor): committed t >= sink with t % stride == 0, latest `capacity`;
             "cyclic" (wave):   committed t >= sink in the bucket of phase t % period, latest `capacity`;
             "merge"  (veil):   finished blocks of `block` frames (none in the sink), latest `capacity`,
                                 each stored as ceil(h/patch) x ceil(w/patch) mean tokens.
    Sink and middle items that overlap the recent window are skipped at read time.
    """

    def __init__(self, name: str, middle: str, sink: int, recent: int, rope_window: int, frames_per_chunk: int,
                 capacity: int, stride: int = 0, period: int = 1, block: int = 0, patch: int = 1):
        if recent < frames_per_chunk:
            raise ValueError(f"recent window {recent} is shorter than a {frames_per_chunk}-frame chunk")
        self.name, self.middle, self.sink, self.recent = name, middle, sink, recent
        self.rope_window, self.capacity = rope_window, capacity
        self.stride, self.period, self.block, self.patch = stride, period, block, patch
        partitions = period if middle == "cyclic" else 1
        hist_slots = sink + (capacity if middle in ("stride", "cyclic") else 0)
        blocks = capacity if middle == "merge" else 0
        self.layout = Layout(recent, blocks, partitions, hist_slots, block if middle == "merge" else 0, patch)
        self.reset()

    def reset(self) -> None:
        self.ring: dict[int, int] = {}  # abs slot -> frame, recent window
        self.sunk: list[int] = []  # sink frames committed (hist slot = frame)
        partitions = self.layout.hist_partitions
        self.fifos = [_Fifo(self.sink, self.capacity) for _ in range(partitions)]
        self.merged = _Fifo(self.recent, self.capacity)

    def begin_chunk(self, t0, frames):
        placed = tuple(t % self.recent for t in range(t0, t0 + frames))
        for t, s in zip(range(t0, t0 + frames), placed):
            self.ring[s] = t
        return placed

    def _block_frames(self, m: int) -> range:
        return range(m * self.block, (m + 1) * self.block)

    def reads(self, t0, frames):
        recent = set(range(max(0, t0 + frames - self.recent), t0 + frames))
        ring = sorted((s, t) for s, t in self.ring.items() if t in recent)
        blocks = [(self.merged.first + i, m) for i, m in enumerate(self.merged.items)
                  if recent.isdisjoint(self._block_frames(m))]
        abs_slots = tuple(s for s, _ in ring) + tuple(s for s, _ in blocks)
        sinks = [t for t in self.sunk if t not in recent]
        recent_seg = Segment("recent", tuple(sorted(t for _, t in ring)), tuple(sorted(t for _, t in ring)))
        merge_frames = tuple(f for _, m in blocks for f in self._block_frames(m))
        merge_seg = Segment("merge", merge_frames, tuple(m * self.block + 1 for _, m in blocks),
                            tuple(m for _, m in blocks))
        out = []
        for t_q in range(t0, t0 + frames):
            shift = max(0, t_q - self.rope_window)
            part = t_q % self.period if self.middle == "cyclic" else 0
            fifo = self.fifos[part] if self.middle in ("stride", "cyclic") else _Fifo(0, 0)
            middle = [(fifo.first + i, t) for i, t in enumerate(fifo.items) if t not in recent]
            hist_slots = tuple(sinks) + tuple(s for s, _ in middle)
            segs = (
                Segment("sink", tuple(sinks), (shift,) * len(sinks)),
                Segment(self.middle, tuple(t for _, t in middle), (shift,) * len(middle)),
                recent_seg,
                merge_seg,
            )
            out.append(Read(abs_slots, part, hist_slots, shift, tuple(s for s in segs if s.frames)))
        return out

    def commit(self, t0, frames):
        ops: list = []
        for t in range(t0, t0 + frames):
            if t < self.sink:
                self.sunk.append(t)
                ops.append(WriteHist(t, tuple(range(self.layout.hist_partitions)), t))
            elif self.middle == "stride" and t % self.stride == 0:
                ops += self._push_hist(0, t)
            elif self.middle == "cyclic":
                ops += self._push_hist(t % self.period, t)
            if self.middle == "merge":
                ops += self._merge(t)
        return ops

    def _push_hist(self, partition: int, t: int) -> list:
        fifo = self.fifos[partition]
        shifted, slot = fifo.push(t)
        shift = [Shift("hist", partition, fifo.first, fifo.first + fifo.capacity)] if shifted else []
        return shift + [WriteHist(t, (partition,), slot)]

    def _merge(self, t: int) -> list:
        m = t // self.block
        if m * self.block < self.sink:
            return []
        ops: list = [Accumulate(t)]
        if t == (m + 1) * self.block - 1:
            shifted, slot = self.merged.push(m)
            if shifted:
                ops.append(Shift("abs", 0, self.merged.first, self.merged.first + self.capacity))
            ops.append(Finalize(m, slot))
        return ops

    def state_dict(self):
        return {"ring": [[s, t] for s, t in sorted(self.ring.items())], "sunk": list(self.sunk),
                "fifos": [list(f.items) for f in self.fifos], "merged": list(self.merged.items)}

    def load_state_dict(self, state):
        self.ring = {int(s): int(t) for s, t in state["ring"]}
        self.sunk = [int(t) for t in state["sunk"]]
        if len(state["fifos"]) != len(self.fifos):
            raise ValueError(f"saved {self.name} rule has {len(state['fifos'])} partitions, expected {len(self.fifos)}")
        for fifo, items in zip(self.fifos, state["fifos"]):
            fifo.items = [int(t) for t in items]
        self.merged.items = [int(m) for m in state["merged"]]

    def held_frames(self):
        """Recent ring, sinks, strided / cyclic FIFOs, every frame of the merged blocks, and the frames
        already summed into the accumulator of the unfinished block."""
        held = set(self.ring.values()) | set(self.sunk) | {t for f in self.fifos for t in f.items}
        held |= {t for m in self.merged.items for t in self._block_frames(m)}
        if self.middle == "merge" and self.ring:
            last = max(self.ring.values())
            m = last // self.block
            if m * self.block >= self.sink and last != (m + 1) * self.block - 1:
                held |= set(range(m * self.block, last + 1))
        return held


def make_rule(kind: str, cache_cfg, frames_per_chunk: int, max_frames: int) -> Rule:
    """Build the rule for one head type (or the `rolling` / `full` baselines) from a CacheConfig."""
    if kind == "full":
        return FullRule(max_frames)
    if kind == "rolling":
        r = cache_cfg.rolling
        return RollingRule(r.window, r.sink, frames_per_chunk, relative=cache_cfg.rope == "relative")
    p = cache_cfg.pyramid
    common = dict(recent=p.recent, rope_window=p.rope_window, frames_per_chunk=frames_per_chunk)
    if kind == "anchor":
        a = p.anchor
        return PyramidRule("anchor", "stride", a.sink, capacity=a.capacity, stride=a.stride, **common)
    if kind == "wave":
        w = p.wave
        return PyramidRule("wave", "cyclic", w.sink, capacity=w.capacity, period=w.period, **common)
    if kind == "veil":
        v = p.veil
        return PyramidRule("veil", "merge", v.sink, capacity=v.capacity, block=v.block, patch=v.patch, **common)
    raise ValueError(f"unknown head type '{kind}'")


def validate_cache_config(cache_cfg) -> None:
    """Reject budgets the rules cannot honour; raises ValueError naming the key."""
    p = cache_cfg.pyramid
    positive = {
        "cache.rolling.window": cache_cfg.rolling.window, "cache.pyramid.recent": p.recent,
        "cache.pyramid.rope_window": p.rope_window, "cache.pyramid.anchor.stride": p.anchor.stride,
        "cache.pyramid.anchor.capacity": p.anchor.capacity, "cache.pyramid.wave.period": p.wave.period,
        "cache.pyramid.wave.capacity": p.wave.capacity, "cache.pyramid.veil.block": p.veil.block,
        "cache.pyramid.veil.patch": p.veil.patch, "cache.pyramid.veil.capacity": p.veil.capacity,
    }
    non_negative = {"cache.rolling.sink": cache_cfg.rolling.sink, "cache.pyramid.anchor.sink": p.anchor.sink,
                    "cache.pyramid.wave.sink": p.wave.sink, "cache.pyramid.veil.sink": p.veil.sink}
    for key, value in positive.items():
        if value <= 0:
            raise ValueError(f"{key} must be positive, got {value}")
    for key, value in non_negative.items():
        if value < 0:
            raise ValueError(f"{key} must be zero or more, got {value}")
    if p.wave.period > MAX_PERIOD:
        raise ValueError(f"cache.pyramid.wave.period {p.wave.period} exceeds the supported maximum {MAX_PERIOD}")
    if cache_cfg.rolling.sink >= cache_cfg.rolling.window:
        raise ValueError("cache.rolling.sink must be smaller than cache.rolling.window")


def merged_tokens(height: int, width: int, patch: int) -> int:
    """Tokens of one merged block: ceil(h / patch) x ceil(w / patch)."""
    return math.ceil(height / patch) * math.ceil(width / patch)
