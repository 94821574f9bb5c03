"""The forward-batch runner: one forward of the model over a ragged batch of prefill chunks and decode
tokens, keys kept in the paged pools. Returns the logits of each request's last token in the batch."""

from __future__ import annotations

import torch

from sparsepd.engine.batch import RequestChunk, build_batch, check_chunks
from sparsepd.engine.graphs import DecodeGraphs
from sparsepd.engine.paged_cache import PagedCache
from sparsepd.engine.pools import KVPools
from sparsepd.engine.request import Request
from sparsepd.model.numerics import rope_cos_sin
from sparsepd.model.transformer import Transformer


class Runner:
    def __init__(self, model: Transformer, pools: KVPools, cuda_graph: bool = False):
        if model.cfg != pools.cfg:
            raise ValueError("the pools were built for another model config")
        self.model, self.pools = model, pools
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(freqs) → cos, sin tables
        self.graphs = DecodeGraphs(model, pools, self.rope_tables) if cuda_graph else None

    def rope_tables(self, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[max_seq_len, rope_dim/2]` fp32 on the device for these frequencies, built once."""
        key = id(freqs)
        if key not in self._rope:
            positions = torch.arange(self.model.cfg.max_seq_len, device=self.pools.device)
            self._rope[key] = rope_cos_sin(positions, freqs)
        return self._rope[key]

    @torch.inference_mode()
    def forward(self, work: list[tuple[Request, list[int]]]) -> torch.Tensor:
        """Logits `[len(work), vocab]` fp32: row b after request b's tokens of this forward. On the graph
        path the tensor is the graph's output buffer: read it before the next forward."""
        device = torch.device(self.pools.device)
        if device.type == "cuda":  # Triton launches on the calling thread's current device: make it the pools'
            with torch.cuda.device(device):
                return self._forward(work)
        return self._forward(work)

    @torch.inference_mode()
    def capture_graphs(self, max_context: int) -> None:
        """Capture the decode graphs for contexts up to max_context tokens now (at start), if graphs are on."""
        if self.graphs is not None:
            with torch.cuda.device(self.pools.device):
                self.graphs.capture_all(max_context)

    def _forward(self, work: list[tuple[Request, list[int]]]) -> torch.Tensor:
        chunks = [RequestChunk(r.slot, r.num_computed, tokens, r.pages) for r, tokens in work]
        check_chunks(chunks, self.pools.geometry, self.model.cfg.vocab_size)
        shape = self.graphs.shape_for(chunks) if self.graphs is not None else None
        if shape is not None:
            return self.graphs.run(chunks, shape)
        batch = build_batch(chunks, self.pools.geometry, self.pools.device)
        cache = PagedCache(batch, self.pools, self.rope_tables)
        return self.model.forward_batch(batch.token_ids, batch.positions, cache, logit_rows=batch.last_rows,
                                        ids_checked=True)
