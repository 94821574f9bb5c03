"""One request's keys for the reference forward: the `AttentionCache` over a `RequestState`.

For a chunk of n tokens at positions s…s+n−1 the keys of a layer live in one table
`[window ring (as before this chunk) | this chunk's kv | committed compressed entries]`, and each token
gets an index row: its window positions, then its compressed entries (every visible one for HCA, the
indexer's top-k for CSA), −1 padded to a width fixed per layer so that a token's arithmetic does not
depend on the chunk it was processed in (batch invariance, see model/numerics.py).
"""

from __future__ import annotations

import torch

from sparsepd.kernels.indexer import indexer_topk, quantize_rows_fp8
from sparsepd.kernels.sparse_attention import sparse_attn, sparse_attn_ref
from sparsepd.kernels.topk import topk_visible
from sparsepd.model.attention import Attention
from sparsepd.model.state import LayerState, RequestState


class RequestCache:
    def __init__(self, state: RequestState):
        self.state = state

    def attend(self, attn: Attention, layer_id: int, x: torch.Tensor, qr: torch.Tensor, q: torch.Tensor,
               kv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        layer, start, n, win = self.state.layers[layer_id], self.state.position, x.shape[0], attn.window
        parts, index_rows = [layer.swa, kv], [window_indices(positions, start, win)]
        if attn.ratio:
            compressed = self._compressed_indices(attn, layer, x, qr, start, positions, cos, sin)
            parts.append(layer.kv_compressed)
            index_rows.append(torch.where(compressed >= 0, compressed + win + n, -1))
        table = torch.cat(parts)
        indices = torch.cat(index_rows, dim=1)
        pad = attn.index_width - indices.shape[1]
        indices = torch.cat([indices, indices.new_full((n, pad), -1)], dim=1).to(torch.int32)
        if q.device.type == "cpu" and q.dtype == torch.float32:
            # float64 on the CPU: vectorized and scalar exp differ in the last bit (model/numerics.py).
            o, _ = sparse_attn_ref(q.double(), table.double(), indices, attn.attn_sink, attn.cfg.softmax_scale)
            o = o.float()
        else:
            o, _ = sparse_attn(q, table, indices, attn.attn_sink, attn.cfg.softmax_scale)  # [n, H, D]
        layer.swa[positions[-win:] % win] = kv[-win:]
        return o

    @staticmethod
    def _compressed_indices(attn: Attention, layer: LayerState, x, qr, start, positions, cos, sin) -> torch.Tensor:
        """Entry positions each token attends to: indexer top-k (CSA) or every visible entry (HCA)."""
        new = attn.compressor(x, start, layer.compressor, attn.freqs)
        layer.kv_compressed = torch.cat([layer.kv_compressed, new])
        visible = torch.div(positions + 1, attn.ratio, rounding_mode="floor")  # [n]
        if attn.indexer is None:
            entries = torch.arange(layer.kv_compressed.shape[0], device=x.device)
            return torch.where(entries[None, :] < visible[:, None], entries[None, :], -1)
        indexer = attn.indexer
        layer.index_keys = torch.cat([layer.index_keys, indexer.compressor(x, start, layer.indexer, attn.freqs)])
        weights, visible = indexer.head_weights(x), visible.to(torch.int32)
        if indexer.quantize == "fp8":  # the serving path: FP8 cache rows scored by the indexer kernels
            n_entries = layer.index_keys.shape[0]
            if n_entries == 0:
                return torch.full((x.shape[0], indexer.topk), -1, dtype=torch.int64, device=x.device)
            q8, q_scale = quantize_rows_fp8(indexer.rotated_q(qr, cos, sin), "ue8m0")  # [n, Hi, 128], [n, Hi]
            page_table = torch.zeros(1, 1, dtype=torch.int32, device=x.device)
            seq_ids = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
            return indexer_topk(q8, q_scale, weights, layer.index_keys[None], page_table, seq_ids, visible,
                                indexer.topk).long()
        # The reference's simulations (fp4, none) in plain PyTorch; a fixed-length sum keeps it batch-invariant.
        q = indexer.project_q(qr, cos, sin)  # [n, Hi, 128]
        dots = (q[:, :, None, :] * layer.index_keys[None, None, :, :]).sum(-1)  # [n, Hi, E]
        scores = (dots.relu() * weights[:, :, None]).sum(1)  # [n, E]
        return topk_visible(scores, visible, indexer.topk).long()


def window_indices(positions: torch.Tensor, start: int, win: int) -> torch.Tensor:
    """Row of each token's window keys (its own and the previous win−1 positions) in the table:
    this chunk's rows for positions ≥ start, else the ring slot; −1 before position 0."""
    keys = positions[:, None] - (win - 1) + torch.arange(win, device=positions.device)  # [n, win]
    rows = torch.where(keys >= start, win + keys - start, keys % win)
    return torch.where(keys >= 0, rows, -1)
