"""The forward-batch runner: one forward of the model over a ragged batch of prefill chunks and decode
tokens, keys kept in the paged pools. Returns the logits of each request's last token in the batch (and,
when asked, the last block's output at chosen rows: prompt log-probabilities, engine/prompt_logprobs.py)."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from sparsepd.engine.batch import RequestChunk, build_batch, check_chunks
from sparsepd.engine.graphs import DecodeGraphs
from sparsepd.engine.paged_cache import PagedCache
from sparsepd.engine.penalties import SlotHistory
from sparsepd.engine.pools import KVPools
from sparsepd.engine.prefill_graphs import PrefillGraphs
from sparsepd.engine.request import PENDING, Request
from sparsepd.engine.spec_graphs import VerifyGraphs
from sparsepd.model.numerics import rope_cos_sin
from sparsepd.model.transformer import Transformer


class Runner:
    def __init__(self, model: Transformer, pools: KVPools, cuda_graph: bool = False):
        if model.cfg != pools.cfg:
            raise ValueError("the pools were built for another model config")
        self.model, self.pools = model, pools
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(freqs) → cos, sin tables
        self.graphs = DecodeGraphs(model, pools, self.rope_tables) if cuda_graph else None
        self.verify_graphs: VerifyGraphs | None = None  # speculative decoding's (`use_verify_graphs`)
        self.prefill_graphs: PrefillGraphs | None = None  # prompt chunks' (`use_prefill_graphs`)
        # Each slot's last sampled token on the device: a PENDING input token is read from here, so a step
        # can be launched before the host has read the previous step's tokens (engine/draw.py).
        self.slot_tokens = torch.zeros(pools.geometry.num_slots, dtype=torch.int64, device=pools.device)
        # Each slot's token counts for the penalties, kept beside slot_tokens (engine/penalties.py).
        self.history = SlotHistory(pools.geometry.num_slots, model.cfg.vocab_size, pools.device)
        # The last forward's slots, when a replayed graph holds them on the device (its static fields): a step whose
        # sampled slots are these (every decode step but one where a request ended meanwhile) remembers its tokens
        # through them, with no host index copied (`remember_tokens`).
        self._graph_slots: tuple[list[int], torch.Tensor] | None = None
        # A step of decode tokens and prompt chunks runs its decode tokens through their graph and the chunks
        # eagerly (`_split_mixed`); False runs such a step eagerly as a whole (bench/profile_mixed.py compares).
        self.split_mixed = True
        # Forwards run, by path: "graph" (a decode or verification replay), "prefill_graph" (prompt chunks replayed,
        # alone or in a split step), "split" (a decode replay beside the step's prompt chunks, replayed or eager),
        # "eager".
        self.forwards = {"graph": 0, "prefill_graph": 0, "split": 0, "eager": 0}

    def rope_tables(self, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[max_seq_len, rope_dim/2]` fp32 on the device for these frequencies, built once."""
        key = id(freqs)
        if key not in self._rope:
            positions = torch.arange(self.model.cfg.max_seq_len, device=self.pools.device)
            self._rope[key] = rope_cos_sin(positions, freqs)
        return self._rope[key]

    @torch.inference_mode()
    def forward(self, work: list[tuple[Request, list[int]]], final_rows: list[int] | None = None,
                logit_rows: list[int] | None = None):
        """Logits `[len(work), vocab]` fp32: row b after request b's tokens of this forward. On the graph
        path the tensor is the graph's output buffer: read it before the next forward. With `final_rows`
        (flat rows of this forward), (logits, the last block's output `[n, hc, dim]` at them); with `logit_rows`
        too, the logits are those of these flat rows (speculative verification: engine/speculative.py), from a
        verification graph when `use_verify_graphs` was called and every chunk fits one (engine/spec_graphs.py),
        else eagerly."""
        device = torch.device(self.pools.device)
        if device.type == "cuda":  # Triton launches on the calling thread's current device: make it the pools'
            with torch.cuda.device(device):
                return self._forward(work, final_rows, logit_rows)
        return self._forward(work, final_rows, logit_rows)

    def use_verify_graphs(self, num_steps: int, capture: bool = True) -> None:
        """Run forwards with `final_rows` (speculative verification) whose chunks all have 1 … num_steps + 1
        tokens from fixed-shape steps (engine/spec_graphs.py): replayed CUDA graphs, or with capture=False the
        same static-shape step run eagerly (any device)."""
        self.verify_graphs = VerifyGraphs(self.model, self.pools, self.rope_tables, num_steps, capture)

    def use_prefill_graphs(self, capture: bool = True) -> None:
        """Run forwards of a few prompt chunks (no decode tokens, or beside a decode replay) from fixed-shape steps
        (engine/prefill_graphs.py): replayed CUDA graphs, or with capture=False the same static-shape step run eagerly
        (any device)."""
        self.prefill_graphs = PrefillGraphs(self.model, self.pools, self.rope_tables, capture)

    @torch.inference_mode()
    def capture_graphs(self, max_context: int) -> None:
        """Capture the decode graphs for contexts up to max_context tokens now (at start), if graphs are on."""
        if self.graphs is not None:
            with torch.cuda.device(self.pools.device):
                self.graphs.capture_all(max_context)
        if self.verify_graphs is not None and self.verify_graphs.steps.capture:
            with torch.cuda.device(self.pools.device):
                self.verify_graphs.capture_all(max_context)

    def remember_tokens(self, slots: list[int], tokens: torch.Tensor) -> None:
        """Keep each slot's newly sampled token (device `[len(slots)]` int64) for its next PENDING input."""
        known = self._graph_slots
        index = known[1] if known is not None and known[0] == slots else to_device(slots, self.pools.device)
        self.slot_tokens.index_copy_(0, index, tokens)
        self.history.record(slots, tokens)

    def remember_host_tokens(self, slots: list[int], tokens: list[int]) -> None:
        """`remember_tokens` of tokens known on the host: slots and tokens go to the device in one copy."""
        index = to_device([slots, tokens], self.pools.device)  # [2, n]
        self.slot_tokens.index_copy_(0, index[0], index[1])
        self.history.record(slots, index[1])

    def _forward(self, work: list[tuple[Request, list[int]]], final_rows: list[int] | None,
                 logit_rows: list[int] | None = None):
        self.history.bind([r for r, _ in work])
        chunks = [RequestChunk(r.slot, r.num_computed, tokens, r.pages, r.captures) for r, tokens in work]
        check_chunks(chunks, self.pools.geometry, self.model.cfg.vocab_size)
        self._graph_slots = None
        shape = self.graphs.shape_for(chunks) if self.graphs is not None and final_rows is None else None
        if shape is not None:
            self.forwards["graph"] += 1
            return self.graphs.run(chunks, shape, lambda fields: self._fill_from_fields(fields, chunks))
        if self.graphs is not None and self.split_mixed and final_rows is None and logit_rows is None:
            split = self._split_mixed(chunks)
            if split is not None:
                return split
        if self.prefill_graphs is not None and final_rows is None and logit_rows is None:
            logits = self._prefill_graph(chunks)
            if logits is not None:
                return logits
        if final_rows is not None and self.verify_graphs is not None:
            shape = self.verify_graphs.shape_for(chunks)
            if shape is not None:
                self.forwards["graph"] += 1
                logits, hidden = self.verify_graphs.run(chunks, shape,
                                                        lambda token_ids: self._fill_pending(token_ids, chunks))
                if logit_rows is None:  # each request's last row
                    logit_rows = list(itertools.accumulate(len(c.token_ids) for c in chunks))
                    logit_rows = [r - 1 for r in logit_rows]
                return self._rows(logits, logit_rows), self._rows(hidden, final_rows)
        self.forwards["eager"] += 1
        return self._eager(chunks, final_rows, logit_rows)

    def _split_mixed(self, chunks: list[RequestChunk]) -> torch.Tensor | None:
        """A step of decode tokens and prompt chunks (a colocated worker's prefill joining the running batch) as two
        forwards: the decode tokens through their CUDA graph, the prompt chunks eagerly, rather than the whole batch
        eagerly. The requests are independent (own slots, pages and state), so the split changes no value; it keeps
        the decode rows' cost at a graph replay's. Logits `[len(chunks), vocab]` in the chunks' order; None when the
        decode tokens have no graph (then the whole step runs eagerly)."""
        single = [i for i, c in enumerate(chunks) if len(c.token_ids) == 1 and not c.captures]
        if not single or len(single) == len(chunks):
            return None
        decode = [chunks[i] for i in single]
        shape = self.graphs.shape_for(decode)
        if shape is None:
            return None
        rest = [c for c in chunks if len(c.token_ids) != 1 or c.captures]
        self.forwards["split"] += 1
        decoded = self.graphs.run(decode, shape, lambda fields: self._fill_from_fields(fields, decode))
        eager = self._prefill_graph(rest) if self.prefill_graphs is not None else None
        if eager is None:
            eager = self._eager(rest, None, None)
        if single == list(range(len(single))):  # the scheduler's order: decode tokens first, then prompt chunks
            return torch.cat([decoded, eager])
        logits = torch.empty(len(chunks), decoded.shape[1], dtype=decoded.dtype, device=decoded.device)
        taken = set(single)
        others = [i for i in range(len(chunks)) if i not in taken]
        logits[to_device(single, logits.device)] = decoded
        logits[to_device(others, logits.device)] = eager
        return logits

    def _prefill_graph(self, chunks: list[RequestChunk]) -> torch.Tensor | None:
        """The chunks' logits from a prompt-chunk replay, or None when no prefill graph holds them."""
        shape = self.prefill_graphs.shape_for(chunks)
        if shape is None:
            return None
        self.forwards["prefill_graph"] += 1
        return self.prefill_graphs.run(chunks, shape, lambda token_ids: self._fill_pending(token_ids, chunks))

    def _eager(self, chunks: list[RequestChunk], final_rows: list[int] | None, logit_rows: list[int] | None):
        batch = build_batch(chunks, self.pools.geometry, self.pools.device)
        self._fill_pending(batch.token_ids, chunks)
        cache = PagedCache(batch, self.pools, self.rope_tables)
        rows = None if final_rows is None else to_device(final_rows, self.pools.device)
        logits_at = batch.last_rows if logit_rows is None else to_device(logit_rows, self.pools.device)
        return self.model.forward_batch(batch.token_ids, batch.positions, cache, logit_rows=logits_at,
                                        ids_checked=True, final_rows=rows)

    def _rows(self, t: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """t's rows `rows` (a view when they are the first len(rows))."""
        if rows == list(range(len(rows))):
            return t[: len(rows)]
        return t[to_device(rows, self.pools.device)]

    def _fill_from_fields(self, fields: dict[str, torch.Tensor], chunks: list[RequestChunk]) -> None:
        """A decode graph's input tokens: each PENDING one becomes its slot's last sampled token, read through the
        slots the graph's static fields already hold on the device (one token a request, padding's token 0 is not
        PENDING): no host index and no pinned copy a step. Keeps those slots for this step's `remember_tokens`."""
        token_ids, slots = fields["token_ids"], fields["slots"]
        torch.where(token_ids == PENDING, self.slot_tokens[slots], token_ids, out=token_ids)
        self._graph_slots = ([c.slot for c in chunks], slots[: len(chunks)])

    def _fill_pending(self, token_ids: torch.Tensor, chunks: list[RequestChunk]) -> None:
        """Replace PENDING input tokens by their slots' last sampled tokens, on the device. The rows are found with a
        few numpy operations over the step's concatenated token ids: no Python loop over the requests or tokens (a
        decode step's every token is PENDING under overlap; a prefill chunk brings thousands)."""
        ids = [c.token_ids for c in chunks]
        if min(map(min, [t for t in ids if t]), default=0) != PENDING:
            return  # no PENDING token (one pass in C; ids are checked ≥ −1)
        lengths = list(map(len, ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=sum(lengths))
        rows = (flat == PENDING).nonzero()[0]
        if rows.shape[0]:
            slots = np.array([c.slot for c in chunks], dtype=np.int64).repeat(lengths)[rows]
            index = to_device(np.array((rows, slots)), self.pools.device)  # [2, n]
            token_ids.index_copy_(0, index[0], self.slot_tokens[index[1]])


def to_device(values: list | np.ndarray, device: torch.device) -> torch.Tensor:
    """Small host ints (a list, or an int64 array) to the device without a sync (from pinned memory on CUDA)."""
    t = torch.as_tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t
