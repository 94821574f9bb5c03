"""CUDA graphs for speculative decoding: the verification forward and the MTP drafter's forwards.

A verification step gives each decoding request its last token and k' ≤ k drafts (engine/speculative.py). It
replays a graph captured per (batch bucket, k + 1 tokens per request, page width) (`BatchShape`): the real
tokens are packed exactly as in the eager layout (request after request, k' + 1 each) and the tail is padding up
to bucket × (k + 1) rows (engine/batch.py). A request with fewer drafts than k (its drafts cut by its length,
pages or the token budget; a request that cannot draft at all: penalties, a grammar) therefore needs no graph of
its own and no padding inside its rows: one graph per bucket serves every mix of draft counts, and the padded
rows, which see no keys and are in no write plan, can neither be seen nor leave a trace. The graph keeps the
logits and the last block's output of every row as static outputs (the accept step reads the logits of each
request's k' + 1 rows, the drafter the output at every row). Chunks of 1 … k + 1 tokens without a boundary
snapshot fit; anything else (longer prefill chunks, snapshots, more requests than the largest bucket, page tables
wider than the pools) runs the step eagerly, as `DecodeGraphs.shape_for` does for plain decoding.

The drafter's forwards (engine/drafter.py) replay graphs of the MTP layer the same way: the extend over each
decoding request's accepted positions (1 … k + 1 rows each, as above) and each chained draft (one row per request),
with the streams h as a static input and the block's output and argmax at each request's last row as static
outputs; the chained drafts stay on the device between replays and reach the host once, after the last.

`StaticSteps` holds one family of such fixed-shape forwards. With `capture=False` it runs the very same
static-shape step (the same padded fields in the same static buffers, the same outputs) eagerly, on any
device: the CPU tests compare that path with the dynamic one (tests/engine/test_spec_graphs.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sparsepd.engine.batch import BatchShape, ForwardBatch, RequestChunk, assemble, host_fields, packed_fields_into
from sparsepd.engine.graphs import (
    DEFAULT_BUCKETS,
    StaticFields,
    buckets_for,
    max_page_width,
    page_width_for,
    warmed_capture,
)
from sparsepd.engine.paged_cache import PagedCache
from sparsepd.engine.pools import KVPools, PoolGeometry

log = logging.getLogger(__name__)

# body(batch, inputs) → outputs: the forward a step runs on its static batch and static inputs
Body = Callable[[ForwardBatch, dict[str, torch.Tensor]], tuple[torch.Tensor, ...]]


@dataclass
class StaticStep:
    """One fixed-shape forward: its static fields and inputs, and its graph (None: run eagerly)."""

    shape: BatchShape
    static: StaticFields
    batch: ForwardBatch
    inputs: dict[str, torch.Tensor]
    body: Body
    graph: torch.cuda.CUDAGraph | None = None
    outputs: tuple[torch.Tensor, ...] = field(default_factory=tuple)

    def run(self) -> tuple[torch.Tensor, ...]:
        """Replay (or run eagerly); the outputs are valid until the next step of any shape runs."""
        if self.graph is None:
            self.outputs = self.body(self.batch, self.inputs)
        else:
            self.graph.replay()
        return self.outputs


class StaticSteps:
    """The fixed-shape forwards of one kind, by shape: captured as CUDA graphs on first use (or by `capture_all`),
    or with capture=False run eagerly from the same static buffers."""

    def __init__(self, name: str, geometry: PoolGeometry, device: torch.device, body: Body,
                 inputs: Callable[[BatchShape], dict[str, torch.Tensor]], capture: bool):
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the pools are on {device}")
        self.name, self.geometry, self.device, self.body = name, geometry, device, body
        self.inputs, self.capture = inputs, capture
        self._steps: dict[BatchShape, StaticStep] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.capture_s = 0.0
        self.runs = 0  # fixed-shape steps run (replays, or eager runs without capture)
        self._smallest_ring = min([geometry.window] + [(2 if r == 4 else 1) * r for r in geometry.ratios if r])

    def step(self, shape: BatchShape) -> StaticStep:
        found = self._steps.get(shape)
        if found is None:
            if self.capture:
                log.info("capturing the %s graph for %s on first use", self.name, shape)
            found = self._build(shape)
        return found

    def fill(self, step: StaticStep, chunks: list[RequestChunk]) -> None:
        """Load the padded fields of `chunks` into the step's static buffer (one host-to-device copy)."""
        # the closed-form numpy builder where it applies, as for decode graphs: a step's host work is on the critical
        # path (tests/engine/test_spec_graphs.py checks that both builders agree)
        if step.shape.tokens_per_request <= self._smallest_ring:
            step.static.fill(lambda views: packed_fields_into(chunks, self.geometry, step.shape, views))
        else:
            step.static.load(host_fields(chunks, self.geometry, step.shape))
        self.runs += 1

    def _build(self, shape: BatchShape) -> StaticStep:
        t0 = time.perf_counter()
        fields = host_fields([], self.geometry, shape)  # all padding: writes nothing a request reads
        static = StaticFields(fields, self.device)
        static.load(fields)
        batch = assemble(static.fields, self.geometry, [])
        step = StaticStep(shape, static, batch, self.inputs(shape), self.body)
        if self.capture:
            step.graph, step.outputs = warmed_capture(lambda: self.body(batch, step.inputs), self._pool)
            self.capture_s += time.perf_counter() - t0
            log.debug("captured the %s graph %s in %.2f s", self.name, shape, time.perf_counter() - t0)
        self._steps[shape] = step
        return step

    @property
    def num_graphs(self) -> int:
        return sum(1 for s in self._steps.values() if s.graph is not None)


class VerifyGraphs:
    """The verification forward of the target model at k + 1 tokens per request (module doc)."""

    def __init__(self, model, pools: KVPools, rope: Callable, num_steps: int, capture: bool = True,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS):
        g = pools.geometry
        self.model, self.pools, self.rope = model, pools, rope
        self.tokens_per_request = num_steps + 1
        self.buckets = buckets_for(max(min(g.num_slots, g.max_batch_tokens // self.tokens_per_request), 1), buckets)
        self.max_pages = max_page_width(model, pools)
        self._out: tuple[torch.Tensor, torch.Tensor] | None = None  # logits [T, V], hidden [T, hc, dim]
        self.steps = StaticSteps("verify", g, pools.device, self._body, self._inputs, capture)

    def _inputs(self, shape: BatchShape) -> dict[str, torch.Tensor]:
        return {"all_rows": torch.arange(shape.tokens, device=self.pools.device)}  # [T]

    def _body(self, batch: ForwardBatch, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        cache = PagedCache(batch, self.pools, self.rope)
        # logits `[T, vocab]` fp32 and the last block's output `[T, hc, dim]` at every row, copied into the shared
        # output buffers: a graph's own outputs would stay allocated per graph (bucket 256 at k = 3 and a 129K
        # vocabulary: 0.5 GB of logits each), while what the forward allocates goes back to the common pool
        logits, hidden = self.model.forward_batch(batch.token_ids, batch.positions, cache, ids_checked=True,
                                                  final_rows=inputs["all_rows"])
        rows = logits.shape[0]
        if self._out is None:  # (at the first, eager, warm-up run) one buffer for every shape, the largest's size
            most = self.buckets[-1] * self.tokens_per_request
            self._out = (logits.new_zeros(most, *logits.shape[1:]), hidden.new_zeros(most, *hidden.shape[1:]))
        self._out[0][:rows].copy_(logits)
        self._out[1][:rows].copy_(hidden)
        return self._out[0][:rows], self._out[1][:rows]

    def shape_for(self, chunks: list[RequestChunk]) -> BatchShape | None:
        """The graph shape for this step, or None when it must run eagerly."""
        q = self.tokens_per_request
        if not chunks or len(chunks) > self.buckets[-1] or \
                any(not 1 <= len(c.token_ids) <= q or c.captures for c in chunks):
            return None
        pages = max(len(c.page_table) for c in chunks)
        if pages > self.max_pages:
            return None
        batch = next(b for b in self.buckets if b >= len(chunks))
        return BatchShape(batch, page_width_for(pages, self.max_pages), q)

    def run(self, chunks: list[RequestChunk], shape: BatchShape,
            before_run: Callable[[torch.Tensor], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits `[T, vocab]`, hidden `[T, hc, dim]`) over the shape's T rows, the real ones first (views of the
        graph's outputs, valid until its next replay). `before_run(token_ids)` may rewrite the loaded input
        tokens on the device first."""
        step = self.steps.step(shape)
        self.steps.fill(step, chunks)
        if before_run is not None:
            before_run(step.batch.token_ids)
        logits, hidden = step.run()
        return logits, hidden

    def capture_all(self, max_context: int) -> None:
        """Capture every bucket at every page width up to `max_context` tokens; log time and memory."""
        widths = sorted({page_width_for(p, self.max_pages)
                         for p in range(1, -(-max_context // self.pools.geometry.page_size) + 1)})
        before, t0 = torch.cuda.memory_reserved(self.pools.device), time.perf_counter()
        for width in reversed(widths):  # largest first: the smaller graphs reuse its pool memory
            for batch in reversed(self.buckets):
                self.steps.step(BatchShape(batch, width, self.tokens_per_request))
        log.info("captured %d verification graphs (buckets %s, %d tokens a request, page widths %s) in %.1f s, "
                 "%.1f MiB of graph memory", self.steps.num_graphs, list(self.buckets), self.tokens_per_request,
                 widths, time.perf_counter() - t0,
                 (torch.cuda.memory_reserved(self.pools.device) - before) / 2**20)


class DraftGraphs:
    """The MTP layer's forwards (engine/drafter.py) at a fixed shape: h `[T, hc, dim]` in, the block's output and
    the argmax draft at each request's last row out (module doc). Its pool has no pages: page width 1."""

    def __init__(self, model, mtp, pools: KVPools, geometry: PoolGeometry, rope: Callable, capture: bool = True,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS):
        self.model, self.mtp, self.pools, self.rope = model, mtp, pools, rope
        self.buckets = buckets_for(min(geometry.num_slots, geometry.max_batch_tokens), buckets)
        self.steps = StaticSteps("draft", geometry, pools.device, self._body, self._inputs, capture)

    def _inputs(self, shape: BatchShape) -> dict[str, torch.Tensor]:
        cfg = self.model.cfg
        dtype = getattr(torch, cfg.dtype)  # the stream's dtype
        return {"h": torch.zeros(shape.tokens, cfg.hc_mult, cfg.dim, dtype=dtype, device=self.pools.device)}

    def _body(self, batch: ForwardBatch, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        cache = PagedCache(batch, self.pools, self.rope)
        y = self.mtp(inputs["h"], self.model.embed(batch.token_ids), batch.token_ids, batch.positions, cache)
        last = y[batch.last_rows]  # [B, hc, dim]
        return last, self.mtp.logits(last, self.model.head.weight).argmax(-1)  # [B] int64

    def shape_for(self, chunks: list[RequestChunk], tokens_per_request: int) -> BatchShape | None:
        """The shape for these chunks at `tokens_per_request` (k + 1 for the extend, 1 for a chained draft), or
        None when they must run eagerly."""
        q = tokens_per_request
        if not chunks or len(chunks) > self.buckets[-1] or len(chunks) * q > self.steps.geometry.max_batch_tokens \
                or any(not 1 <= len(c.token_ids) <= q or c.captures for c in chunks):
            return None
        return BatchShape(next(b for b in self.buckets if b >= len(chunks)), 1, q)

    def capture_all(self, num_steps: int) -> None:
        """Capture the extend (k + 1 rows a request) and chained-draft (one row) graphs of every bucket."""
        t0 = time.perf_counter()
        for q in sorted({num_steps + 1, 1}, reverse=True):
            for batch in reversed(self.buckets):
                if batch * q <= self.steps.geometry.max_batch_tokens:
                    self.steps.step(BatchShape(batch, 1, q))
        log.info("captured %d draft graphs (buckets %s) in %.1f s", self.steps.num_graphs, list(self.buckets),
                 time.perf_counter() - t0)
