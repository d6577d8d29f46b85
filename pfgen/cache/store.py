"""Per-(layer, head type) K/V memory and the commit operations that `cache.policy` emits.

Layout, for n heads of one type: region abs (B, tokens, n, D) and region hist (partitions, B, tokens, n, D),
slot after slot, token-major like the model's (B, L, heads, D) so that attention reads them as free views;
merged blocks keep fp32 accumulators. Keys are stored rotated: abs at their own (t, y, x), hist at (0, y, x),
so that any temporal position can be given at read time without touching the store.
All indexing uses Python ints from the plan: no host syncs.
"""

from __future__ import annotations

import math

import torch

from pfgen.cache.policy import Accumulate, Finalize, Layout, Shift, WriteHist, merged_tokens
from pfgen.rope import apply_rope


def store_shapes(layout: Layout, batch: int, heads: int, grid: tuple[int, int], head_dim: int) -> dict:
    """Shape of each K (and, equally, V) tensor a RuleStore allocates: "abs", "hist" (when the layout has
    history slots) and "acc" (the fp32 merge accumulator, when it merges). The memory planner sums the same."""
    frame_tokens = grid[0] * grid[1]
    block_tokens = merged_tokens(*grid, layout.merge_patch) if layout.merge_block else 0
    shapes = {"abs": (batch, layout.abs_tokens(frame_tokens, block_tokens), heads, head_dim)}
    if layout.hist_slots and not layout.hist_in_abs:
        shapes["hist"] = (layout.hist_partitions, batch, layout.hist_slots * frame_tokens, heads, head_dim)
    if layout.merge_block:
        shapes["acc"] = (batch, block_tokens, heads, head_dim)
    return shapes


def store_nbytes(layout: Layout, batch: int, heads: int, grid: tuple[int, int], head_dim: int, itemsize: int) -> int:
    """Bytes of one RuleStore without allocating it (K and V; accumulators in fp32)."""
    shapes = store_shapes(layout, batch, heads, grid, head_dim)
    return 2 * sum(math.prod(shape) * (4 if name == "acc" else itemsize) for name, shape in shapes.items())


class RuleStore:
    """K/V of the heads of one type in one layer, sized by the type's layout and never by video length."""

    def __init__(self, layout: Layout, batch: int, heads: int, grid: tuple[int, int], head_dim: int,
                 dtype: torch.dtype, device):
        self.layout = layout
        self.grid = grid
        self.frame_tokens = grid[0] * grid[1]
        self.block_tokens = merged_tokens(*grid, layout.merge_patch) if layout.merge_block else 0
        sizes = [self.frame_tokens] * layout.abs_frames + [self.block_tokens] * layout.abs_blocks
        self.abs_offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        shapes = store_shapes(layout, batch, heads, grid, head_dim)
        self.k_abs = torch.zeros(shapes["abs"], dtype=dtype, device=device)
        self.v_abs = torch.zeros(shapes["abs"], dtype=dtype, device=device)
        self.k_hist = self.v_hist = None
        if layout.hist_in_abs:  # a view of the first abs slots, as one partition
            tokens = layout.hist_slots * self.frame_tokens
            self.k_hist, self.v_hist = self.k_abs[None, :, :tokens], self.v_abs[None, :, :tokens]
        elif "hist" in shapes:
            self.k_hist = torch.zeros(shapes["hist"], dtype=dtype, device=device)
            self.v_hist = torch.zeros(shapes["hist"], dtype=dtype, device=device)
        self.acc_k = self.acc_v = None
        if "acc" in shapes:
            acc = shapes["acc"]
            self.acc_k = torch.zeros(acc, dtype=torch.float32, device=device)
            self.acc_v = torch.zeros(acc, dtype=torch.float32, device=device)
            self.patch_counts = self._patch_counts(device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_tensors().values())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The stored K/V and accumulators by name (saved states); a hist view of abs is not storage of its own."""
        names = ("k_abs", "v_abs", "acc_k", "acc_v") + (() if self.layout.hist_in_abs else ("k_hist", "v_hist"))
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors in; a saved region may be shorter along the token axis (the `full` policy's
        history, saved for fewer frames than this video holds), then it fills the first tokens."""
        for name, mine in self.state_tensors().items():
            saved = tensors[name]
            axis = 2 if name.endswith("hist") else 1
            if saved.dim() != mine.dim() or saved.shape[axis] > mine.shape[axis] or any(
                    a != b for i, (a, b) in enumerate(zip(saved.shape, mine.shape)) if i != axis):
                raise ValueError(f"saved {name} has shape {tuple(saved.shape)}, this cache {tuple(mine.shape)}")
            mine.zero_()
            mine.narrow(axis, 0, saved.shape[axis]).copy_(saved)

    def reset(self) -> None:
        for t in self.state_tensors().values():
            t.zero_()

    def abs_range(self, slot: int) -> tuple[int, int]:
        return self.abs_offsets[slot], self.abs_offsets[slot + 1]

    def write_current(self, k_rot: torch.Tensor, v: torch.Tensor, slots: tuple[int, ...]) -> None:
        """Write the chunk's frames (k rotated at own positions), (B, F*N, n, D), into their abs slots."""
        n = self.frame_tokens
        for f, slot in enumerate(slots):
            a, b = self.abs_range(slot)
            self.k_abs[:, a:b] = k_rot[:, f * n:(f + 1) * n]
            self.v_abs[:, a:b] = v[:, f * n:(f + 1) * n]

    def commit(self, ops, k_raw: torch.Tensor, v: torch.Tensor, t0: int, tables: dict) -> None:
        """Apply a chunk's commit ops. k_raw/v: (B, F*N, n, D), keys not yet rotated.

        tables["hist"]: (cos, sin) at temporal 0 for one frame; tables[("block", m)]: a merged block's.
        """
        n = self.frame_tokens
        for op in ops:
            if isinstance(op, WriteHist):
                f = op.frame - t0
                k = apply_rope(k_raw[:, f * n:(f + 1) * n], tables["hist"])
                a, b = op.slot * n, (op.slot + 1) * n
                for p in op.partitions:
                    self.k_hist[p, :, a:b] = k
                    self.v_hist[p, :, a:b] = v[:, f * n:(f + 1) * n]
            elif isinstance(op, Shift):
                self._shift(op)
            elif isinstance(op, Accumulate):
                f = op.frame - t0
                self.acc_k += self._pool(k_raw[:, f * n:(f + 1) * n])
                self.acc_v += self._pool(v[:, f * n:(f + 1) * n])
            elif isinstance(op, Finalize):
                self._finalize(op, tables[("block", op.block)])

    def _shift(self, op: Shift) -> None:
        if op.region == "hist":
            n = self.frame_tokens
            a, b = op.start * n, op.stop * n
            for t in (self.k_hist, self.v_hist):
                t[op.partition, :, a:b - n] = t[op.partition, :, a + n:b].clone()
        else:
            a, b = self.abs_offsets[op.start], self.abs_offsets[op.stop]
            size = self.abs_offsets[op.start + 1] - a
            for t in (self.k_abs, self.v_abs):
                t[:, a:b - size] = t[:, a + size:b].clone()

    def _patch_counts(self, device) -> torch.Tensor:
        ones = torch.ones(1, self.frame_tokens, 1, 1, device=device)
        return self._pool(ones)[0]  # (Nb, 1, 1): real tokens per patch (edges may be partial)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over patch x patch spatial tiles: (B, h*w, n, D) -> (B, Nb, n, D) in float32."""
        h, w = self.grid
        p = self.layout.merge_patch
        b, _, heads, d = x.shape
        grid = x.float().reshape(b, h, w, heads, d)
        grid = torch.nn.functional.pad(grid, (0, 0, 0, 0, 0, (-w) % p, 0, (-h) % p))
        hp, wp = grid.shape[1] // p, grid.shape[2] // p
        return grid.reshape(b, hp, p, wp, p, heads, d).sum(dim=(2, 4)).reshape(b, hp * wp, heads, d)

    def _finalize(self, op: Finalize, table) -> None:
        denom = self.patch_counts * self.layout.merge_block
        k = apply_rope(self.acc_k / denom, table)
        a, b = self.abs_range(op.slot)
        self.k_abs[:, a:b] = k.to(self.k_abs.dtype)
        self.v_abs[:, a:b] = (self.acc_v / denom).to(self.v_abs.dtype)
        self.acc_k.zero_()
        self.acc_v.zero_()
