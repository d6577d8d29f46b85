"""The KV cache the attention processors talk to: rules + per-layer stores + the current chunk's plan.

One chunk = `begin_chunk` (plan once), then passes (`attend` per layer), the last of which commits, then the
next chunk. Heads of each layer are grouped by type so that every type is served by batched calls.
The attention itself is a backend handed in by the caller (`pfgen.attention.get_backend`), so that `cache/`
never imports `attention/`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from pfgen.cache.plan import ChunkPlan, build_plan
from pfgen.cache.policy import make_rule
from pfgen.cache.store import RuleStore, store_nbytes
from pfgen.rope import apply_rope


@dataclass(frozen=True)
class CacheGeometry:
    """What the store must know about the model and the video."""

    layers: int
    heads: int
    head_dim: int
    grid: tuple[int, int]  # latent tokens per frame, (h, w) after patching
    batch: int = 1
    max_frames: int = 0  # only the `full` policy needs it
    theta: float = 10000.0


class KVCache:
    """Head-aware KV cache. `head_types[layer][head]` names each head's rule (anchor/wave/veil/rolling/full)."""

    def __init__(self, cache_cfg, head_types, geometry: CacheGeometry, frames_per_chunk: int, dtype, device,
                 backend):
        """`backend(rule_plan, store, q_raw, q_abs) -> (B, F*N, n, D)`: see `pfgen.attention`."""
        self.geometry = geometry
        self.backend = backend
        kinds = sorted({kind for row in head_types for kind in row})
        self.rules = {k: make_rule(k, cache_cfg, frames_per_chunk, geometry.max_frames) for k in kinds}
        self.head_types = [list(row) for row in head_types]
        self.layer_heads = [self._head_groups(row, device) for row in head_types]
        self.stores = [
            {kind: RuleStore(self.rules[kind].layout, geometry.batch, _count(heads, geometry.heads),
                             geometry.grid, geometry.head_dim, dtype, device)
             for kind, heads in groups.items()}
            for groups in self.layer_heads
        ]
        by_kind = {kind: store for layer in self.stores for kind, store in layer.items()}
        self._abs_offsets = {kind: store.abs_offsets for kind, store in by_kind.items()}
        self._device = torch.device(device)
        self.plan: ChunkPlan | None = None
        self.committing = False
        self.observer = None  # optional callable(layer, q_abs, k_abs, plan, committing), e.g. profiling
        self.timer = None  # optional callable(region) -> context manager around "plan" and "attention" (benchmarks)

    @staticmethod
    def _head_groups(row, device) -> dict:
        """Head indices per kind: a slice when contiguous (a free view), else an index tensor."""
        groups = {}
        for kind in sorted(set(row)):
            idx = [h for h, k in enumerate(row) if k == kind]
            contiguous = idx == list(range(idx[0], idx[-1] + 1))
            groups[kind] = slice(idx[0], idx[-1] + 1) if contiguous else torch.tensor(idx, device=device)
        return groups

    def reset(self) -> None:
        """Forget the video: a new prompt starts from an empty cache (storage is reused)."""
        for rule in self.rules.values():
            rule.reset()
        for layer in self.stores:
            for store in layer.values():
                store.reset()
        self.plan = None

    def begin_chunk(self, t0: int, frames: int) -> ChunkPlan:
        if self.timer is not None:
            with self.timer("plan"):
                return self._begin_chunk(t0, frames)
        return self._begin_chunk(t0, frames)

    def _begin_chunk(self, t0: int, frames: int) -> ChunkPlan:
        g = self.geometry
        self.plan = build_plan(self.rules, t0, frames, g.grid, g.head_dim, g.theta, self._abs_offsets, self._device)
        return self.plan

    def set_pass(self, commit: bool) -> None:
        """Noisy passes (commit=False) only overwrite the chunk's tentative slots; the clean pass commits."""
        self.committing = commit

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope) -> torch.Tensor:
        """Self-attention of the chunk's tokens over the cache.

        q, k, v: (B, F*N, heads, D) before RoPE; rope: complex rotations of the chunk's own positions,
        (F*N, 1, D/2). A layer served by one head type returns the backend's output as is.
        """
        if self.timer is not None:
            with self.timer("attention"):
                return self._attend(layer, q, k, v, rope)
        return self._attend(layer, q, k, v, rope)

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope) -> torch.Tensor:
        plan = self.plan
        q_abs = apply_rope(q, rope)
        k_abs = apply_rope(k, rope)
        if self.observer is not None:
            self.observer(layer, q_abs, k_abs, plan, self.committing)
        groups = self.layer_heads[layer]
        out = torch.empty_like(q) if len(groups) > 1 else None
        for kind, heads in groups.items():
            store = self.stores[layer][kind]
            rp = plan.rules[kind]
            store.write_current(k_abs[:, :, heads], v[:, :, heads], rp.write_slots)
            o = self.backend(rp, store, q[:, :, heads], q_abs[:, :, heads])
            if self.committing:
                store.commit(rp.ops, k[:, :, heads], v[:, :, heads], plan.t0, plan.tables)
            if out is None:
                return o
            out[:, :, heads] = o
        return out

    def held_frames(self) -> set[int]:
        """Committed frames behind any stored item of any head type (what re-cache re-encodes)."""
        return set().union(*(rule.held_frames() for rule in self.rules.values()))

    def window_recache(self, end: int) -> tuple[bool, int]:
        """(restart, first frame) of a `recache: window` before the chunk at `end` (`Rule.window_recache`); the
        windowed policies have one rule."""
        (answer,) = {rule.window_recache(end) for rule in self.rules.values()}
        return answer

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors by "layer.kind.name", each rule's bookkeeping as JSON data): all a later run needs."""
        tensors = {f"{layer}.{kind}.{name}": t for layer, stores in enumerate(self.stores)
                   for kind, store in stores.items() for name, t in store.state_tensors().items()}
        return tensors, {kind: rule.state_dict() for kind, rule in self.rules.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], rules: dict) -> None:
        """Restore what `state_dict` gave (raises KeyError / ValueError when it does not fit this cache)."""
        if set(rules) != set(self.rules):
            raise ValueError(f"saved head types {sorted(rules)}, this cache has {sorted(self.rules)}")
        for kind, rule in self.rules.items():
            rule.load_state_dict(rules[kind])
        for layer, stores in enumerate(self.stores):
            for kind, store in stores.items():
                prefix = f"{layer}.{kind}."
                store.load_state_tensors({k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)})
        self.plan = None

    def nbytes(self) -> int:
        """Bytes held by the cache (all layers, all types)."""
        return sum(store.nbytes() for layer in self.stores for store in layer.values())


def cache_nbytes(cache_cfg, head_types, geometry: CacheGeometry, frames_per_chunk: int, itemsize: int) -> int:
    """What `KVCache(...).nbytes()` will be, from shapes alone (the memory planner's KV figure)."""
    kinds = sorted({kind for row in head_types for kind in row})
    rules = {k: make_rule(k, cache_cfg, frames_per_chunk, geometry.max_frames) for k in kinds}
    g = geometry
    return sum(store_nbytes(rules[kind].layout, g.batch, count, g.grid, g.head_dim, itemsize)
               for row in head_types for kind, count in Counter(row).items())


def _count(heads, total: int) -> int:
    return len(range(total)[heads]) if isinstance(heads, slice) else int(heads.numel())
