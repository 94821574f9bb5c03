"""CUDA graphs for prompt chunks: a forward of a few prefill chunks replayed from a fixed shape instead of launched
op by op from Python.

An eager forward's host time does not shrink with its tokens: every layer's launches go out one by one from Python,
so a step that carries a 128-token prompt costs as much host time as a long one. On a colocated worker such a step
sits between the decode steps (engine/runner.py `_split_mixed` replays the decode tokens' own graph beside it); on a
prefill worker a prompt that hits the prefix cache leaves only a few hundred tokens to compute. Both are what a
replay serves.

A prompt-chunk forward replays a graph captured per (batch bucket, tokens per request, page width) (`BatchShape`,
the speculative verification's layout: engine/spec_graphs.py): the chunks are packed as in the eager layout (request
after request) and the tail is padding up to bucket × tokens-per-request rows, which sees no keys and is in no write
plan. One graph per (bucket, tokens) serves every mix of chunk lengths up to its tokens per request. The logits of
each request's last row are the graph's output. What a graph does not hold runs eagerly: boundary snapshots of the
prefix cache (a chunk with `captures`), prompt log-probabilities, more chunks than the largest bucket, a chunk longer
than the largest tokens-per-request, more rows than `max_rows`.

Off by default (`--prefill-cuda-graph`): the graphs are captured on first use (logged), each holds its activations
at its row count in one pool shared by the family.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sparsepd.engine.batch import BatchShape, ForwardBatch, RequestChunk
from sparsepd.engine.graphs import buckets_for, max_page_width, page_width_for
from sparsepd.engine.paged_cache import PagedCache
from sparsepd.engine.pools import KVPools
from sparsepd.engine.spec_graphs import StaticSteps

PREFILL_BUCKETS = (1, 2, 4, 8)  # chunks a forward
PREFILL_TOKENS = (64, 128, 256, 512)  # tokens per chunk
PREFILL_MAX_ROWS = 1024  # bucket × tokens per chunk


class PrefillGraphs:
    """Fixed-shape forwards of prompt chunks (module doc)."""

    def __init__(self, model, pools: KVPools, rope: Callable, capture: bool = True, max_rows: int = PREFILL_MAX_ROWS,
                 tokens: tuple[int, ...] = PREFILL_TOKENS):
        g = pools.geometry
        self.model, self.pools, self.rope = model, pools, rope
        self.max_rows = min(max_rows, g.max_batch_tokens)
        self.tokens = tuple(q for q in sorted(tokens) if q <= self.max_rows)
        self.buckets = buckets_for(min(g.num_slots, PREFILL_BUCKETS[-1]), PREFILL_BUCKETS)
        self.max_pages = max_page_width(model, pools)
        self._out: torch.Tensor | None = None  # logits [largest bucket, vocab], shared by every shape
        self.steps = StaticSteps("prefill", g, pools.device, self._body, lambda shape: {}, capture)

    def _body(self, batch: ForwardBatch, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        cache = PagedCache(batch, self.pools, self.rope)
        logits = self.model.forward_batch(batch.token_ids, batch.positions, cache, logit_rows=batch.last_rows,
                                          ids_checked=True)  # [bucket, vocab] fp32
        if self._out is None:  # (at the first, eager, warm-up run) one buffer for every shape, the largest's size
            self._out = logits.new_zeros(self.buckets[-1], logits.shape[1])
        rows = logits.shape[0]
        self._out[:rows].copy_(logits)
        return (self._out[:rows],)

    def shape_for(self, chunks: list[RequestChunk]) -> BatchShape | None:
        """The shape for these chunks, or None when they must run eagerly (module doc)."""
        if not chunks or len(chunks) > self.buckets[-1] or not self.tokens or any([c.captures for c in chunks]):
            return None
        longest = max(map(len, [c.token_ids for c in chunks]))
        q = next((q for q in self.tokens if q >= longest), None)
        if q is None:
            return None
        batch = next(b for b in self.buckets if b >= len(chunks))
        if batch * q > self.max_rows:
            return None
        pages = max(map(len, [c.page_table for c in chunks]))
        if pages > self.max_pages:
            return None
        return BatchShape(batch, page_width_for(pages, self.max_pages), q)

    def run(self, chunks: list[RequestChunk], shape: BatchShape,
            before_run: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Logits `[len(chunks), vocab]` after each chunk's last token (a view of the shared output, valid until the
        next prefill replay). `before_run(token_ids)` may rewrite the loaded input tokens on the device first."""
        step = self.steps.step(shape)
        self.steps.fill(step, chunks)
        if before_run is not None:
            before_run(step.batch.token_ids)
        (logits,) = step.run()
        return logits[: len(chunks)]
