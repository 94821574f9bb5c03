"""DeepSeek-V4 attention: low-rank Q, one shared MQA latent (K = V), sliding window + compressed keys,
sparse attention with a per-head sink, inverse RoPE, grouped low-rank output (dsv4-spec.md "Attention").

For a chunk of n tokens at positions s…s+n−1 the keys live in one table
`[window ring (as before this chunk) | this chunk's kv | committed compressed entries]` and each token
gets an index row: its window positions, then its compressed entries (all visible ones for HCA, the
indexer's top-k for CSA), −1 padded to a width fixed per layer so that a token's arithmetic does not
depend on the chunk it was processed in.
"""

from __future__ import annotations

import torch
from sparsepd.kernels.sparse_attention import sparse_attn
from sparsepd.model.compressor import Compressor, RMSNorm
from sparsepd.model.config import ModelConfig
from sparsepd.model.indexer import Indexer
from sparsepd.model.numerics import apply_rope, fp8_round_trip, linear, rope_cos_sin, rope_freqs
from sparsepd.model.state import LayerState
from torch import nn


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        dtype = getattr(torch, cfg.dtype)
        self.cfg, self.ratio = cfg, cfg.compress_ratios[layer_id]
        self.n_heads, self.head_dim, self.rope_dim, self.window = cfg.n_heads, cfg.head_dim, cfg.rope_dim, cfg.window

        def lin(i: int, o: int) -> nn.Linear:
            return nn.Linear(i, o, bias=False, dtype=dtype).requires_grad_(False)

        self.attn_sink = nn.Parameter(torch.zeros(cfg.n_heads), requires_grad=False)  # fp32
        self.wq_a = lin(cfg.dim, cfg.q_lora_rank)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps, dtype)
        self.wq_b = lin(cfg.q_lora_rank, cfg.n_heads * cfg.head_dim)
        self.wkv = lin(cfg.dim, cfg.head_dim)
        self.kv_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, dtype)
        self.wo_a = lin(cfg.n_heads * cfg.head_dim // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank)
        self.wo_b = lin(cfg.o_groups * cfg.o_lora_rank, cfg.dim)
        self.compressor = self.indexer = None
        if self.ratio:
            self.compressor = Compressor(cfg.dim, cfg.head_dim, cfg.rope_dim, self.ratio, cfg.norm_eps, "main",
                                         "fp8" if cfg.quantize_kv else "none", dtype)
            self.indexer = Indexer(cfg, self.ratio, dtype) if self.ratio == 4 else None
            # Compressed layers use compress_rope_theta with YaRN for the whole layer; SWA-only plain RoPE.
            self.freqs = rope_freqs(cfg.rope_dim, cfg.compress_rope_theta, cfg.original_seq_len,
                                    cfg.rope_factor, cfg.beta_fast, cfg.beta_slow)
            n_compressed = cfg.index_topk if self.ratio == 4 else cfg.max_entries(self.ratio)
        else:
            self.freqs = rope_freqs(cfg.rope_dim, cfg.rope_theta, 0, 1.0, cfg.beta_fast, cfg.beta_slow)
            n_compressed = 0
        self.index_width = cfg.window + n_compressed

    def forward(self, x: torch.Tensor, start: int, state: LayerState) -> torch.Tensor:
        n, win = x.shape[0], self.window
        positions = torch.arange(start, start + n, device=x.device)
        cos, sin = rope_cos_sin(positions, self.freqs)
        qr = self.q_norm(linear(x, self.wq_a.weight))
        q = linear(qr, self.wq_b.weight).unflatten(-1, (self.n_heads, self.head_dim))  # [n, H, D]
        q = (q.float() * torch.rsqrt(q.float().square().mean(-1, keepdim=True) + self.cfg.norm_eps)).to(q.dtype)
        q = apply_rope(q, cos, sin)
        kv = apply_rope(self.kv_norm(linear(x, self.wkv.weight)), cos, sin)  # [n, D]
        if self.cfg.quantize_kv:
            kv = torch.cat([fp8_round_trip(kv[:, : -self.rope_dim], 64), kv[:, -self.rope_dim:]], dim=-1)

        # Key table and index rows (see the module docstring).
        window_idx = self._window_indices(positions, start, n)  # [n, win]
        parts, index_rows = [state.swa, kv], [window_idx]
        if self.ratio:
            compressed_idx = self._compressed_indices(x, qr, start, positions, cos, sin, state)
            parts.append(state.kv_compressed)
            index_rows.append(torch.where(compressed_idx >= 0, compressed_idx + win + n, -1))
        table = torch.cat(parts)
        indices = torch.cat(index_rows, dim=1)
        pad = self.index_width - indices.shape[1]
        indices = torch.cat([indices, indices.new_full((n, pad), -1)], dim=1).to(torch.int32)

        o, _ = sparse_attn(q, table, indices, self.attn_sink, self.cfg.softmax_scale)  # [n, H, D]
        last = positions[-win:]
        state.swa[last % win] = kv[-win:]
        o = apply_rope(o, cos, sin, inverse=True)
        return self._output(o)

    def _window_indices(self, positions: torch.Tensor, start: int, n: int) -> torch.Tensor:
        """Row of each token's window keys (its own and the previous window−1 positions) in the table."""
        win = self.window
        keys = positions[:, None] - (win - 1) + torch.arange(win, device=positions.device)  # [n, win]
        rows = torch.where(keys >= start, win + keys - start, keys % win)  # new rows, else ring slot
        return torch.where(keys >= 0, rows, -1)

    def _compressed_indices(self, x, qr, start, positions, cos, sin, state: LayerState) -> torch.Tensor:
        """Entry positions each token attends to: indexer top-k (CSA) or every visible entry (HCA)."""
        new = self.compressor(x, start, state.compressor, self.freqs)
        state.kv_compressed = torch.cat([state.kv_compressed, new])
        if self.indexer is not None:
            return self.indexer(x, qr, start, cos, sin, self.freqs, state)
        entries = torch.arange(state.kv_compressed.shape[0], device=x.device)
        visible = torch.div(positions + 1, self.ratio, rounding_mode="floor")
        return torch.where(entries[None, :] < visible[:, None], entries[None, :], -1)

    def _output(self, o: torch.Tensor) -> torch.Tensor:
        """Grouped low-rank output: group g of o `[H·D/G]` times its own `[o_lora_rank, H·D/G]` slice of wo_a."""
        groups, rank = self.cfg.o_groups, self.cfg.o_lora_rank
        o = o.reshape(o.shape[0], groups, -1)
        wo_a = self.wo_a.weight.view(groups, rank, -1)
        mid = torch.cat([linear(o[:, g], wo_a[g]) for g in range(groups)], dim=-1)  # [n, G*rank]
        return linear(mid, self.wo_b.weight)
