"""Memory pools of one worker (docs/DESIGN.md §6): paged compressed caches, per-request slots, allocators.

A page holds `page_size` original tokens (the lcm of the compress ratios): per CSA layer `page_size/4`
compressed KV rows and as many indexer rows, per HCA layer `page_size/ratio` rows. One page table per
request serves every layer. A slot holds a request's sliding-window rings and compressor rings; the capture
slots after the requests' ones receive the prefix cache's boundary states while a forward computes them, and
the snapshot store keeps them slimmed to what a restore needs (engine/snapshot_store.py, engine/prefix_cache.py).

Per layer, attention reads one unified row buffer `kv[layer]`:

    [ scratch: max_batch_tokens | SWA rings: ring_slots·window | compressed rows: num_pages·page_size/ratio ]

Its rows are FP8 KV rows (kernels/kv_rows.py, `[rows, row_bytes]` uint8: 448 e4m3 nope values, 64 bf16 rope
values and 7 scale bytes in 584 bytes on V4) when the model rounds its KV to FP8 (`quantize_kv`), else
`[rows, head_dim]` in the model's dtype; `kv_layout` says which (None: float rows). Every writer (scratch
rows, compressor, SWA ring) and reader (sparse attention) takes it, so both formats share one code path.

The scratch rows hold the current forward's new KV latents, so a prefill chunk longer than the window
still sees every key; sparse attention addresses all three regions by row index. The first two regions
have the same size in every layer, so one set of row indices (built once per forward) serves all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from sparsepd.engine.snapshot_store import SnapshotStore
from sparsepd.kernels.kv_rows import KVRowLayout
from sparsepd.model_config import ModelConfig

INDEX_ROW_BYTES = 144  # 128 FP8 values + fp32 scale + padding (kernels/indexer.py)


class OutOfCapacity(RuntimeError):
    """A request does not fit the pools now (or ever): the service answers RESOURCE_EXHAUSTED."""


class PoolConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    num_slots: int = Field(16, ge=1, description="requests that can hold state at once")
    max_batch_tokens: int = Field(512, ge=1, description="tokens of one forward (scratch rows)")
    num_pages: int | None = Field(None, ge=1, description="pages; when None, sized from kv_memory_bytes")
    kv_memory_bytes: int | None = Field(None, ge=1, description="budget for pages + slots + scratch")
    gpu_memory_fraction: float = Field(0.5, gt=0.0, le=0.95, description="of free GPU memory, when no budget")
    prefix_cache_entries: int = Field(0, ge=0, description="prefix-cache boundary snapshots kept on the device "
                                                         "(`bytes_per_snapshot` each, plus a few capture slots; 0 = no "
                                                         "cache; engine/prefix_cache.py)")
    prefix_cache_host_bytes: int = Field(0, ge=0, description="host memory for the prefix cache's snapshots and pages "
                                                             "evicted from the device, shared with retracted requests' "
                                                             "states (0 = no host tier; engine/host_memory.py)")


@dataclass(frozen=True)
class PoolGeometry:
    """Every size of the pools, derived from the model config and the pool config."""

    num_slots: int
    num_pages: int
    page_size: int
    window: int
    max_batch_tokens: int
    ratios: tuple[int, ...]  # per layer
    num_snapshot_slots: int = 0  # slots past the requests' ones: where a forward captures boundary states
    num_snapshot_entries: int = 0  # the snapshot store's entries (engine/snapshot_store.py)

    @property
    def ring_slots(self) -> int:
        """Slots with rings: the requests' (ids 0 … num_slots−1), then the snapshots'."""
        return self.num_slots + self.num_snapshot_slots

    def rows_per_page(self, ratio: int) -> int:
        return self.page_size // ratio if ratio else 0

    @property
    def ring_base(self) -> int:
        return self.max_batch_tokens

    @property
    def compressed_base(self) -> int:
        return self.max_batch_tokens + self.ring_slots * self.window

    def layer_rows(self, ratio: int) -> int:
        return self.compressed_base + self.num_pages * self.rows_per_page(ratio)


def kv_row_layout(cfg: ModelConfig) -> KVRowLayout | None:
    """The FP8 KV row layout of this model's main KV cache, or None for float rows (quantize_kv off)."""
    return KVRowLayout(cfg.head_dim, cfg.rope_dim, getattr(torch, cfg.dtype)) if cfg.quantize_kv else None


def kv_row_bytes(cfg: ModelConfig) -> int:
    """Bytes of one row of the main KV cache (SWA ring, scratch or compressed row)."""
    layout = kv_row_layout(cfg)
    return layout.row_bytes if layout else cfg.head_dim * torch.finfo(getattr(torch, cfg.dtype)).bits // 8


def bytes_per_page(cfg: ModelConfig) -> int:
    row = kv_row_bytes(cfg)
    total = 0
    for ratio in cfg.compress_ratios:
        if ratio:
            total += cfg.page_size // ratio * row
        if ratio == 4:
            total += cfg.page_size // 4 * INDEX_ROW_BYTES
    return total


def bytes_per_slot(cfg: ModelConfig) -> int:
    total = 0
    for ratio in cfg.compress_ratios:
        total += cfg.window * kv_row_bytes(cfg)
        if ratio:
            coff = 2 if ratio == 4 else 1
            total += 2 * coff * ratio * coff * cfg.head_dim * 4
        if ratio == 4:
            total += 2 * 8 * 2 * cfg.index_head_dim * 4
    return total


def bytes_per_snapshot(cfg: ModelConfig) -> int:
    """Bytes of one boundary snapshot in the prefix cache's store (engine/snapshot_store.py): per layer the SWA ring
    (with the page equal to the window: the rows of the page before the boundary) and, where the compressor
    overlaps (CSA), the carried half-block of its rings and the indexer's; an HCA ring carries nothing across a
    page boundary (its block ends there)."""
    total = 0
    for ratio in cfg.compress_ratios:
        total += cfg.window * kv_row_bytes(cfg)
        if ratio == 4:  # coff 2: the previous block's `ratio` rows of kv and score, 2·head_dim wide; the indexer's too
            total += 2 * ratio * 2 * cfg.head_dim * 4 + 2 * ratio * 2 * cfg.index_head_dim * 4
    return total


def capture_slots(pool: PoolConfig, page_size: int) -> int:
    """Capture slots a prefix cache needs: one per boundary one forward crosses (its tokens' pages, plus one for a
    chunk that starts inside a page), at most one per entry."""
    if not pool.prefix_cache_entries:
        return 0
    return min(pool.prefix_cache_entries, pool.max_batch_tokens // page_size + 1)


def plan_geometry(cfg: ModelConfig, pool: PoolConfig, device: torch.device) -> PoolGeometry:
    """Choose the page count: given, or what the memory budget leaves after slots and scratch."""
    captures = capture_slots(pool, cfg.page_size)
    fixed = (pool.num_slots + captures) * bytes_per_slot(cfg) + pool.prefix_cache_entries * bytes_per_snapshot(cfg)
    fixed += cfg.n_layers * pool.max_batch_tokens * kv_row_bytes(cfg)
    num_pages = pool.num_pages
    if num_pages is None:
        budget = pool.kv_memory_bytes
        if budget is None:
            if device.type != "cuda":
                raise ValueError("on the CPU give num_pages or kv_memory_bytes (no free-memory query)")
            budget = int(torch.cuda.mem_get_info(device)[0] * pool.gpu_memory_fraction)
        num_pages = (budget - fixed) // max(bytes_per_page(cfg), 1)
        if num_pages < 1:
            raise ValueError(f"a memory budget of {budget} bytes leaves no page: slots and scratch need {fixed}, "
                             f"a page {bytes_per_page(cfg)}")
    return PoolGeometry(pool.num_slots, int(num_pages), cfg.page_size, cfg.window, pool.max_batch_tokens,
                        cfg.compress_ratios, captures, pool.prefix_cache_entries)


class IdAllocator:
    """Free-list allocator of integer ids (pages or slots) with used/free counters. An id can have several
    holders (a page shared by a cached prefix and the requests restored from it, engine/prefix_cache.py):
    `share` adds one, `free` drops one, and the id is free again when its last holder lets go."""

    def __init__(self, capacity: int, what: str, first: int = 0):
        """Ids first … first + capacity − 1."""
        self.capacity, self.what = capacity, what
        self._free = list(range(first + capacity - 1, first - 1, -1))
        self._refs: dict[int, int] = {}  # allocated id → holders

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._refs)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > self.capacity:
            raise OutOfCapacity(f"needs {n} {self.what}, the pool has {self.capacity} in all")
        if n > len(self._free):
            raise OutOfCapacity(f"needs {n} {self.what}, {len(self._free)} of {self.capacity} are free")
        ids = [self._free.pop() for _ in range(n)]
        for i in ids:
            self._refs[i] = 1
        return ids

    def share(self, ids: list[int]) -> None:
        """One more holder for each of these allocated ids."""
        bad = [i for i in ids if i not in self._refs]
        if bad:
            raise ValueError(f"sharing {self.what} {bad} that are not allocated")
        for i in ids:
            self._refs[i] += 1

    def refs(self, i: int) -> int:
        """How many hold id i (0: free)."""
        return self._refs.get(i, 0)

    def free(self, ids: list[int]) -> None:
        """One holder fewer for each id; those left with none go back to the free list."""
        counts: dict[int, int] = {}
        for i in ids:
            counts[i] = counts.get(i, 0) + 1
        bad = [i for i, n in counts.items() if self._refs.get(i, 0) < n]
        if bad:
            raise ValueError(f"freeing {self.what} {bad} that are not allocated (double free?)")
        freed = []
        for i in ids:
            self._refs[i] -= 1
            if self._refs[i] == 0:
                del self._refs[i]
                freed.append(i)
        self._free.extend(reversed(freed))


class KVPools:
    """The tensors of docs/DESIGN.md §6 for every layer, allocated once."""

    def __init__(self, cfg: ModelConfig, geometry: PoolGeometry, device: torch.device | str):
        self.cfg, self.geometry, self.device = cfg, geometry, torch.device(device)
        g = geometry
        self.kv_layout = kv_row_layout(cfg)  # None: float rows [rows, head_dim]
        if self.kv_layout is None:
            row_shape, row_dtype = (cfg.head_dim,), getattr(torch, cfg.dtype)
        else:
            row_shape, row_dtype = (self.kv_layout.row_bytes,), torch.uint8
        self.kv = [torch.zeros(g.layer_rows(r), *row_shape, dtype=row_dtype, device=self.device) for r in g.ratios]
        self.index_cache = [
            torch.zeros(g.num_pages, g.rows_per_page(4), INDEX_ROW_BYTES, dtype=torch.uint8, device=self.device)
            if r == 4 else None for r in g.ratios]
        self.rings = [self._rings(r, cfg.head_dim) if r else None for r in g.ratios]
        self.index_rings = [self._rings(4, cfg.index_head_dim) if r == 4 else None for r in g.ratios]
        self.pages = IdAllocator(g.num_pages, "pages")
        self.slots = IdAllocator(g.num_slots, "slots")
        self.snapshots = IdAllocator(g.num_snapshot_slots, "snapshot capture slots", first=g.num_slots)
        self.snapshot_store = (SnapshotStore(cfg, g, self.device, row_shape, row_dtype)
                               if g.num_snapshot_entries else None)
        # Per-slot state of layers outside these pools that travels with a request's (exported, imported,
        # retracted, forked, snapshotted): name → `[ring_slots, ...]`, e.g. the MTP layer's SWA ring
        # (engine/drafter.py).
        self.extra_slot_state: dict[str, torch.Tensor] = {}

    def _rings(self, ratio: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        coff = 2 if ratio == 4 else 1
        shape = (self.geometry.ring_slots, coff * ratio, coff * d)
        # (kv and score in one allocation: speculative decoding's undo log moves a row of both in one operation,
        # engine/undo.py)
        both = torch.empty((2, *shape), dtype=torch.float32, device=self.device)
        both[0].zero_()
        both[1].fill_(float("-inf"))
        return both[0], both[1]

    def compressed_view(self, layer_id: int) -> torch.Tensor:
        """The compressed rows of a CSA/HCA layer as pages `[num_pages, rows_per_page, row width]`."""
        g, ratio = self.geometry, self.geometry.ratios[layer_id]
        base, rpp = g.compressed_base, g.rows_per_page(ratio)
        return self.kv[layer_id][base: base + g.num_pages * rpp].view(g.num_pages, rpp, -1)

    def swa_view(self, layer_id: int) -> torch.Tensor:
        """The sliding-window rings `[ring_slots, window, row width]`."""
        g = self.geometry
        return self.kv[layer_id][g.ring_base: g.compressed_base].view(g.ring_slots, g.window, -1)

    def reset_slot(self, slot: int) -> None:
        """A fresh slot: compressor rings back to kv 0 / score −inf (SWA rows are never read unwritten)."""
        for rings in (*self.rings, *self.index_rings):
            if rings is not None:
                rings[0][slot].zero_()
                rings[1][slot].fill_(float("-inf"))

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.geometry.page_size)

    def num_bytes(self) -> int:
        tensors = [*self.kv, *[t for t in self.index_cache if t is not None]]
        tensors += [t for r in (*self.rings, *self.index_rings) if r is not None for t in r]
        if self.snapshot_store is not None:
            tensors += list(self.snapshot_store.parts.values())
        return sum(t.numel() * t.element_size() for t in tensors)
