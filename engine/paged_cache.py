"""The engine's `AttentionCache`: keys of a ragged batch in the paged pools, through the kernels.

Per layer and forward: the new KV latents go to the scratch rows (packed as FP8 KV rows when the pools hold
them, kernels/kv_rows.py); compressed layers run the fused compressor over the batch's compress plan
(entries straight into the paged cache) and then the ring writes; CSA layers also compress indexer keys
into the FP8 indexer cache and pick each token's top-k with `indexer_topk`; HCA layers take every visible
entry. Sparse attention then reads window rows and compressed rows from the layer's one buffer
(dequantizing FP8 rows in registers), and the SWA rings take
each request's last `window` scratch rows as they are stored.
Everything index-like comes from the `ForwardBatch` built once per forward; a layer does no host work.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sparsepd.engine.batch import ForwardBatch, RatioMeta
from sparsepd.engine.pools import KVPools
from sparsepd.kernels.compressor import compress_indexer, compress_main
from sparsepd.kernels.entry_rows import entry_rows
from sparsepd.kernels.indexer import indexer_topk, quantize_rows_fp8
from sparsepd.kernels.kv_rows import pack_kv_rows
from sparsepd.kernels.sparse_attention import sparse_attn
from sparsepd.kernels.state_update import compressor_state_write, swa_ring_write
from sparsepd.model.attention import Attention
from sparsepd.model.compressor import Compressor


class PagedCache:
    def __init__(self, batch: ForwardBatch, pools: KVPools, rope: Callable[[torch.Tensor], tuple]):
        self.batch, self.pools, self.rope = batch, pools, rope

    def cos_sin(self, positions: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[n, rope_dim/2]` at these positions: rows of the runner's tables (`rope`, built once from the
        same expression), equal to model/numerics.py's rope_cos_sin(positions, freqs) bit for bit; two gathers a
        layer where that takes six launches (compressed layers: model/attention.py). Nothing is kept between
        calls: a captured graph's forward must gather at replay time (the cache object outlives the warm-up runs
        before the capture)."""
        cos, sin = self.rope(freqs)
        return cos[positions], sin[positions]

    def attend(self, attn: Attention, layer_id: int, x: torch.Tensor, qr: torch.Tensor, q: torch.Tensor,
               kv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, pools = self.batch, self.pools
        buf, layout = pools.kv[layer_id], pools.kv_layout
        scratch = buf[: batch.num_tokens]
        if layout is None:
            scratch.copy_(kv)
        else:  # the latent's nope dims are already on the FP8 grid: the rows hold the same numbers
            pack_kv_rows(kv, layout, scratch)
        index_rows = [batch.window_rows]
        if attn.ratio:
            meta = batch.ratios[attn.ratio]
            rings = pools.rings[layer_id]
            self._compress(attn.compressor, x, meta, rings, pools.compressed_view(layer_id), attn, fp8_rows=False)
            if attn.indexer is None:
                index_rows.append(meta.hca_rows)
            else:
                index_rows.append(self._select(attn, layer_id, x, qr, cos, sin, meta))
        indices = torch.cat(index_rows, dim=1)
        o, _ = sparse_attn(q, buf, indices, attn.attn_sink, attn.cfg.softmax_scale, kv_layout=layout)
        swa_ring_write(scratch, pools.swa_view(layer_id), batch.slots, batch.swa_plan)  # rows as stored
        return o

    def _compress(self, compressor: Compressor, x: torch.Tensor, meta: RatioMeta, rings, cache: torch.Tensor,
                  attn: Attention, fp8_rows: bool) -> None:
        """Commit this forward's entries into the paged cache, then advance the rings (one launch each)."""
        kv_rows, score_rows = compressor.project(x)
        cos, sin = self.rope(attn.freqs)
        args = (kv_rows, score_rows, compressor.ape, rings[0], rings[1], self.batch.slots, meta.plan,
                compressor.norm.weight, cos, sin, cache, self.batch.page_table)
        if fp8_rows:
            compress_indexer(*args, eps=compressor.norm.eps, act_dtype=compressor.act_dtype)
        else:
            compress_main(*args, eps=compressor.norm.eps, act_dtype=compressor.act_dtype,
                          fp8_nope=compressor.quantize == "fp8", row_layout=self.pools.kv_layout)
        compressor_state_write(kv_rows, score_rows, compressor.ape, rings[0], rings[1], self.batch.slots, meta.plan)

    def _select(self, attn: Attention, layer_id: int, x, qr, cos, sin, meta: RatioMeta) -> torch.Tensor:
        """Rows of each token's top-k compressed entries (CSA), −1 padded."""
        indexer, pools, batch = attn.indexer, self.pools, self.batch
        cache = pools.index_cache[layer_id]
        self._compress(indexer.compressor, x, meta, pools.index_rings[layer_id], cache, attn, fp8_rows=True)
        q = indexer.rotated_q(qr, cos, sin)  # [T, Hi, 128] fp32
        q8, q_scale = quantize_rows_fp8(q, "ue8m0")  # [T, Hi, 128] fp8, [T, Hi]
        top = indexer_topk(q8, q_scale, indexer.head_weights(x), cache,
                           batch.page_table, batch.seq_ids, meta.visible, indexer.topk,
                           order="position")  # [T, k] entry positions; attention needs the set only
        return entry_rows(top, batch.page_table, batch.seq_ids, meta.rows_per_page, pools.geometry.compressed_base)
