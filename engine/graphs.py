"""CUDA-graph decode: the whole decode forward captured once per (batch bucket, page width), replayed each step.

A decode step of B requests is padded up to the smallest bucket ≥ B (engine/batch.py `BatchShape`; padding
is inert) and to a page-table width that is a power of two (so a graph serves a range of context lengths
and short contexts do not pay for the longest one). Its metadata is built on the host into one pinned
buffer and copied to the device with one asynchronous copy (`StaticFields`); the graph reads it from
there. Graphs share one memory pool, so their activations occupy the memory of the largest.

Capture happens at start for every bucket at the page widths `capture_all` is given (the time and graph
memory are logged); a shape met later is captured on first use (logged too). Anything a graph does not
hold (prefill chunks, more requests than the largest bucket, wider page tables than the pools allow) runs
eagerly, as does everything when graphs are off (`--no-cuda-graph`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from sparsepd.engine.batch import BatchShape, RequestChunk, assemble, decode_fields_into, host_fields
from sparsepd.engine.paged_cache import PagedCache
from sparsepd.engine.pools import KVPools
from sparsepd.model.transformer import Transformer

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
MIN_PAGE_WIDTH = 8
_ALIGN = 16


def buckets_for(max_batch: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> tuple[int, ...]:
    """The buckets up to `max_batch` (the slots), plus max_batch itself when it falls between two."""
    kept = tuple(b for b in buckets if b <= max_batch)
    return kept if kept and kept[-1] == max_batch else kept + (max_batch,)


def decode_shape(chunks: list[RequestChunk], buckets: tuple[int, ...], max_pages: int) -> BatchShape | None:
    """The graph shape of a step of one-token chunks (the smallest bucket that holds them, the page width of the
    longest page table), or None when it must run eagerly: another chunk length, more chunks than the largest
    bucket or pages than max_pages, or a boundary snapshot (engine/prefix_restore.py: it writes rows a graph does
    not hold). Lengths are taken with map over lists: a few calls a step, not a few a request."""
    if not chunks or len(chunks) > buckets[-1]:
        return None
    lengths = list(map(len, [c.token_ids for c in chunks]))
    if max(lengths) != 1 or min(lengths) != 1 or any([c.captures for c in chunks]):
        return None
    pages = max(map(len, [c.page_table for c in chunks]))
    if pages > max_pages:
        return None
    batch = next(b for b in buckets if b >= len(chunks))
    return BatchShape(batch, page_width_for(pages, max_pages))


def max_page_width(model: Transformer, pools: KVPools) -> int:
    """The widest page table a graph may need: a context of max_seq_len tokens, within the pool's pages."""
    g = pools.geometry
    return min(g.num_pages, -(-model.cfg.max_seq_len // g.page_size))


def page_width_for(pages: int, max_pages: int) -> int:
    """The power of two ≥ pages (at least MIN_PAGE_WIDTH), capped at max_pages."""
    width = MIN_PAGE_WIDTH
    while width < pages:
        width *= 2
    return min(width, max_pages)


class StaticFields:
    """Fixed-shape batch fields in one device buffer, loaded from a pinned host buffer with one copy.

    Two host buffers alternate, so the host can fill step N+1's while step N's copy is still queued; before
    refilling a buffer the host waits for the event recorded after its last copy (normally long done)."""

    def __init__(self, template: dict[str, torch.Tensor], device: torch.device):
        self.layout: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
        offset = 0
        for name, t in template.items():
            self.layout[name] = (offset, t.dtype, tuple(t.shape))
            offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        self.num_bytes = max(offset, _ALIGN)
        pinned = device.type == "cuda"
        self.device_buffer = torch.zeros(self.num_bytes, dtype=torch.uint8, device=device)
        self._host = [torch.zeros(self.num_bytes, dtype=torch.uint8, pin_memory=pinned) for _ in range(2)]
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._next = 0
        self.fields = self._views(self.device_buffer)
        self._numpy = [{k: v.numpy() for k, v in self._views(h).items()} for h in self._host]

    def _views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, (offset, dtype, shape) in self.layout.items():
            size = dtype.itemsize
            numel = 1
            for s in shape:
                numel *= s
            out[name] = buffer[offset: offset + numel * size].view(dtype).view(shape)
        return out

    def load(self, fields: dict[str, torch.Tensor]) -> None:
        """Copy `fields` (CPU tensors of the template's shapes) into the device buffer: one H2D copy."""
        def copy(views: dict[str, np.ndarray]) -> None:
            for name, t in fields.items():
                views[name][...] = t.numpy()
        self.fill(copy)

    def fill(self, write: Callable[[dict[str, np.ndarray]], None]) -> None:
        """`write` fills numpy views of a host buffer in place; then one H2D copy to the device buffer."""
        i = self._next
        self._next ^= 1
        if self._events[i] is not None:
            self._events[i].synchronize()
        write(self._numpy[i])
        self.device_buffer.copy_(self._host[i], non_blocking=True)
        if self.device_buffer.is_cuda:  # each buffer's event is made once and recorded again at each of its copies
            if self._events[i] is None:
                self._events[i] = torch.cuda.Event()
            self._events[i].record()


@contextlib.contextmanager
def capturing(graph: torch.cuda.CUDAGraph, pool) -> Iterator[None]:
    """Capture into `graph` with Python's cyclic garbage collector held off: a collection that runs mid-capture and
    frees an older engine's CUDA graph (an unreferenced cycle) destroys a graph while the stream captures, which
    invalidates the capture ("operation not permitted when stream is capturing"). torch.cuda.graph collects once
    before it starts; nothing is collected until the capture ends."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            yield
    finally:
        if enabled:
            gc.enable()


def warmed_capture(body: Callable[[], T], pool, warmups: int = 2) -> tuple[torch.cuda.CUDAGraph, T]:
    """Run `body` `warmups` times on a side stream (its kernels compiled, lazily built tables filled), then capture
    one more run into a new graph in `pool`: the graph and what the captured run returned."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with capturing(graph, pool):
        out = body()
    torch.cuda.synchronize()
    return graph, out


@dataclass
class DecodeGraph:
    shape: BatchShape
    static: StaticFields
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [shape.batch, vocab] fp32, written by every replay


class DecodeGraphs:
    """The captured decode graphs of one engine and the choice of graph for a step."""

    def __init__(self, model: Transformer, pools: KVPools, rope: Callable, buckets: tuple[int, ...] = DEFAULT_BUCKETS):
        if pools.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the pools are on {pools.device}")
        g = pools.geometry
        self.model, self.pools, self.rope = model, pools, rope
        self.buckets = buckets_for(min(g.num_slots, g.max_batch_tokens), buckets)
        self.max_pages = max_page_width(model, pools)
        self._graphs: dict[BatchShape, DecodeGraph] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self.capture_s = 0.0

    def shape_for(self, chunks: list[RequestChunk]) -> BatchShape | None:
        """The graph shape for this step, or None when it must run eagerly."""
        return decode_shape(chunks, self.buckets, self.max_pages)

    def run(self, chunks: list[RequestChunk], shape: BatchShape,
            before_replay: Callable[[dict[str, torch.Tensor]], None] | None = None) -> torch.Tensor:
        """Logits `[len(chunks), vocab]` (a view of the graph's output, valid until its next replay).
        `before_replay(fields)` may rewrite the loaded input tokens (`fields["token_ids"]`) on the device first, from
        the other loaded fields (the device views of `StaticFields`: valid until the next step's load, which the
        stream orders after whatever reads them now)."""
        graph = self._graphs.get(shape)
        if graph is None:
            log.info("capturing the decode graph for %s on first use", shape)
            graph = self.capture(shape)
        graph.static.fill(lambda views: decode_fields_into(chunks, self.pools.geometry, shape, views))
        if before_replay is not None:
            before_replay(graph.static.fields)
        graph.graph.replay()
        return graph.logits[: len(chunks)]

    def capture_all(self, max_context: int) -> None:
        """Capture every bucket at every page width up to `max_context` tokens; log time and memory."""
        widths = sorted({page_width_for(p, self.max_pages)
                         for p in range(1, -(-max_context // self.pools.geometry.page_size) + 1)})
        before, t0 = torch.cuda.memory_reserved(self.pools.device), time.perf_counter()
        for width in reversed(widths):  # largest first: the smaller graphs reuse its pool memory
            for batch in reversed(self.buckets):
                self.capture(BatchShape(batch, width))
        log.info("captured %d decode graphs (buckets %s, page widths %s) in %.1f s, %.1f MiB of graph memory",
                 len(self._graphs), list(self.buckets), widths, time.perf_counter() - t0,
                 (torch.cuda.memory_reserved(self.pools.device) - before) / 2**20)

    def capture(self, shape: BatchShape) -> DecodeGraph:
        t0 = time.perf_counter()
        fields = host_fields([], self.pools.geometry, shape)  # all padding: writes nothing a request reads
        static = StaticFields(fields, self.pools.device)
        static.load(fields)
        batch = assemble(static.fields, self.pools.geometry, [])
        cache = PagedCache(batch, self.pools, self.rope)

        def forward() -> torch.Tensor:
            return self.model.forward_batch(batch.token_ids, batch.positions, cache, ids_checked=True)

        graph, logits = warmed_capture(forward, self._pool)
        self._graphs[shape] = captured = DecodeGraph(shape, static, graph, logits)
        self.capture_s += time.perf_counter() - t0
        log.debug("captured the decode graph %s in %.2f s", shape, time.perf_counter() - t0)
        return captured

    def get(self, shape: BatchShape) -> DecodeGraph | None:
        """The captured graph of this shape, if any."""
        return self._graphs.get(shape)

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)
