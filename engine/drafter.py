"""Draft tokens for speculative decoding: the checkpoint's MTP layer (model/mtp.py), or an oracle for benchmarks.

After each step the scheduler (engine/speculative.py) tells the drafter which positions of which requests are
now computed for good (`DraftSpan`: the prompt chunks and the accepted part of each verification, with the
model's last stream at those rows) and asks for up to k drafts of every request that decodes next.

`MTPDrafter` keeps the MTP layer's own attention state per request in a one-layer pool (same slots and window as
the model's; the layer is sliding-window only) and runs, per step:

1. extend: the MTP block over every span's rows, row i taking the model's stream h_i and the embedding of
   token i+1 (the token at the next position, now known), at position i: its keys go into the MTP ring;
2. draft 1 = argmax of the MTP logits at each span's last row (the token two positions after it);
3. drafts 2 … k chained through the same layer, EAGLE-style: the next row takes the MTP block's own output
   stream in place of the model's and the previous draft's embedding, one position further. These chained
   positions are not final (the next step's extend recomputes them from the model's streams), so their ring
   rows are saved before and written back after the chain (engine/undo.py).

With graphs (`graphs=True`: engine/spec_graphs.py `DraftGraphs`), an extend whose spans have 1 … k + 1 rows each
(the accepted positions of decoding requests) and every chained draft replay fixed-shape steps, the chained
drafts passed from one replay to the next on the device and read once at the end; an extend with a prefill chunk
or a boundary snapshot runs eagerly.

Drafts are greedy (argmax): verification treats a draft as a point mass, which keeps sampled rows exact
(engine/speculative.py). The MTP ring of a slot is registered in the model's pools (`extra_slot_state`), so it
travels with the request's state wherever that goes (export/import, retraction, forks: engine/state_io.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from sparsepd.engine.batch import RequestChunk, build_batch
from sparsepd.engine.paged_cache import PagedCache
from sparsepd.engine.pools import KVPools, PoolGeometry
from sparsepd.engine.request import Request
from sparsepd.engine.runner import to_device
from sparsepd.engine.spec_graphs import DraftGraphs
from sparsepd.engine.undo import Span, UndoLog, undo_targets
from sparsepd.model.mtp import MTPBlock
from sparsepd.model.transformer import Transformer

MTP_STATE = "mtp.swa"  # the MTP layer's SWA ring `[window, row]` in a request's shipped state


@dataclass(frozen=True)
class DraftSpan:
    """Positions start … start+len(rows)−1 of `request`, computed for good in this step: `rows` are their rows in
    the step's hidden `[T, hc, dim]`, `next_ids` the token at each position + 1; `propose`: draft after it."""

    request: Request
    start: int
    rows: list[int]
    next_ids: list[int]
    propose: bool
    # a prefill chunk's prefix-cache boundary snapshots: (boundary, capture slot), whose rings this layer's
    # forward writes too (engine/prefix_restore.py)
    captures: tuple[tuple[int, int], ...] = ()


class Drafter(Protocol):
    def draft(self, spans: list[DraftSpan], hidden: torch.Tensor, k: int) -> dict[Request, list[int]]:
        """Advance every span; up to k drafts for the request of each span with `propose`."""
        ...


class MTPDrafter:
    def __init__(self, model: Transformer, mtp: MTPBlock, pools: KVPools,
                 rope: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], graphs: bool = False,
                 capture: bool = True):
        """pools: the model's (the MTP pool has their slots, window and scratch rows, and its ring travels with
        each request's state there as `mtp.swa`: engine/state_io.py); rope: the runner's cos/sin tables;
        graphs: fixed-shape forwards where they fit, captured as CUDA graphs (capture) or run eagerly."""
        if mtp.cfg.window != model.cfg.window or mtp.cfg.dim != model.cfg.dim:
            raise ValueError("the MTP layer was built for another model config")
        self.model, self.mtp = model, mtp
        g = pools.geometry
        self.geometry = PoolGeometry(g.num_slots, 1, g.page_size, g.window, g.max_batch_tokens, (0,),
                                     g.num_snapshot_slots)
        self.pools, self.rope = KVPools(mtp.cfg, self.geometry, pools.device), rope
        pools.extra_slot_state[MTP_STATE] = self.pools.swa_view(0)
        if pools.snapshot_store is not None:  # prefix-cache snapshots keep the ring too (a restore drafts as cold)
            pools.snapshot_store.add_part(MTP_STATE, self.pools.swa_view(0))
        self.graphs = DraftGraphs(model, mtp, self.pools, self.geometry, rope, capture) if graphs else None
        self._undo_targets = undo_targets(self.pools)

    @torch.inference_mode()
    def capture_graphs(self, num_steps: int) -> None:
        """Capture the draft graphs now (at start), if graphs are on and captured."""
        if self.graphs is not None and self.graphs.steps.capture:
            with torch.cuda.device(self.pools.device):
                self.graphs.capture_all(num_steps)

    @torch.inference_mode()
    def draft(self, spans: list[DraftSpan], hidden: torch.Tensor, k: int) -> dict[Request, list[int]]:
        spans = [s for s in spans if s.rows]
        if not spans:
            return {}
        device = self.pools.device
        chunks = [RequestChunk(s.request.slot, s.start, s.next_ids, [], s.captures) for s in spans]
        flat = [r for s in spans for r in s.rows]
        proposing = [i for i, s in enumerate(spans) if s.propose]
        index = to_device(flat + proposing, device)  # the spans' rows and the proposing spans: one copy, no sync
        rows = index[: len(flat)]
        shape = self.graphs.shape_for(chunks, k + 1) if self.graphs is not None else None
        if shape is not None:
            h, tokens = self._replay(shape, chunks, hidden[rows])
        else:
            y, batch = self._forward(chunks, hidden[rows])
            h, tokens = y[batch.last_rows], None
        drafts: dict[Request, list[int]] = {spans[i].request: [] for i in proposing}
        if not proposing or k == 0:
            return drafts
        chosen = index[len(flat):]
        h = h[chosen]
        tokens = self._argmax(h) if tokens is None else tokens[chosen]
        positions = [spans[i].start + len(spans[i].rows) for i in proposing]  # the chain's first position
        slots = [spans[i].request.slot for i in proposing]
        undo = UndoLog(self.pools, [Span(s, (), p, p + k - 1) for s, p in zip(slots, positions, strict=True)
                                    if k > 1], self._undo_targets)
        chained = self._chain(slots, positions, h, tokens, k)  # [k, n] on the host
        for j, i in enumerate(proposing):
            drafts[spans[i].request] = [step[j] for step in chained]
        undo.restore(positions if k > 1 else [])
        return drafts

    def _chain(self, slots: list[int], positions: list[int], h: torch.Tensor, tokens: torch.Tensor,
               k: int) -> list[list[int]]:
        """Drafts 2 … k from draft 1 (`tokens` [n], the MTP output h [n, hc, dim] before it): each step's row
        takes the previous step's output stream and draft, one position further. Every draft, step by step."""
        shape = None
        if self.graphs is not None:
            shape = self.graphs.shape_for([RequestChunk(s, p, [0], []) for s, p in zip(slots, positions,
                                                                                      strict=True)], 1)
        if shape is None:  # eagerly: each step's drafts read on the host, the next step's chunks carry them
            out = [tokens.tolist()]
            for step in range(1, k):
                chunks = [RequestChunk(s, p + step - 1, [t], [])
                          for s, p, t in zip(slots, positions, out[-1], strict=True)]
                h, _ = self._forward(chunks, h)
                out.append(self._argmax(h).tolist())
            return out
        steps = [tokens.clone()]  # (the graphs' outputs are overwritten by the next replay)
        for step in range(1, k):
            chunks = [RequestChunk(s, p + step - 1, [0], []) for s, p in zip(slots, positions, strict=True)]
            h, tokens = self._replay(shape, chunks, h, tokens)
            steps.append(tokens[: len(slots)].clone())
        return torch.stack(steps).tolist()

    def _replay(self, shape, chunks: list[RequestChunk], h: torch.Tensor, token_ids: torch.Tensor | None = None):
        """The fixed-shape step of `shape` over `chunks` with streams h `[n, hc, dim]` (and, when given, the
        input tokens `[len(chunks)]` from the device): (output stream, argmax draft) at each chunk's last row."""
        step = self.graphs.steps.step(shape)
        self.graphs.steps.fill(step, chunks)
        step.inputs["h"][: h.shape[0]].copy_(h)
        if token_ids is not None:
            step.batch.token_ids[: len(chunks)].copy_(token_ids[: len(chunks)])
        last, tokens = step.run()
        return last[: len(chunks)], tokens[: len(chunks)]

    def _forward(self, chunks: list[RequestChunk], h: torch.Tensor):
        """The MTP block over `chunks` (token ids: each row's next token) with the streams h `[n, hc, dim]`."""
        batch = build_batch(chunks, self.geometry, self.pools.device)
        cache = PagedCache(batch, self.pools, self.rope)
        embedded = self.model.embed(batch.token_ids)
        return self.mtp(h, embedded, batch.token_ids, batch.positions, cache), batch

    def _argmax(self, y: torch.Tensor) -> torch.Tensor:
        return self.mtp.logits(y, self.model.head.weight).argmax(-1)


class OracleDrafter:
    """Drafts each request's known continuation (`references[request_id]`, e.g. a greedy run without
    speculation), every draft token kept with probability `accept` and replaced by another token otherwise
    (seeded): a set acceptance rate, to measure the mechanism's cost and ceiling (bench/bench_spec.py)."""

    def __init__(self, references: dict[str, list[int]], accept: float, vocab_size: int, seed: int = 0):
        if not 0.0 <= accept <= 1.0:
            raise ValueError(f"accept must lie in [0, 1], got {accept}")
        self.references, self.accept, self.vocab_size = references, accept, vocab_size
        self.rng = random.Random(seed)

    def draft(self, spans: list[DraftSpan], hidden: torch.Tensor, k: int) -> dict[Request, list[int]]:
        out = {}
        for s in spans:
            ref = self.references.get(s.request.request_id)
            if s.propose and ref is not None:
                truth = ref[len(s.request.output_ids): len(s.request.output_ids) + k]
                out[s.request] = [t if self.rng.random() < self.accept else (t + 1) % self.vocab_size for t in truth]
        return out
