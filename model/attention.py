"""DeepSeek-V4 attention: low-rank Q, one shared MQA latent (K = V), sliding window + compressed keys,
sparse attention with a per-head sink, inverse RoPE, grouped low-rank output (docs/dsv4-spec.md "Attention layer").

The layer computes queries and the new KV latents; where keys live is the business of an
`AttentionCache`: `model/request_cache.py` keeps one request's state for the reference forward, the
engine keeps paged pools for ragged batches. The cache commits compressed entries, picks each token's
keys (its window, then all visible entries for HCA or the indexer's top-k for CSA) and runs the sparse
attention with the sink.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from sparsepd.kernels.rope_norm import rms_rope
from sparsepd.model.compressor import Compressor, RMSNorm
from sparsepd.model.indexer import Indexer
from sparsepd.model.linear import grouped_linear, make_linear
from sparsepd.model.numerics import rope_cos_sin, rope_freqs
from sparsepd.model_config import ModelConfig


class AttentionCache(Protocol):
    def attend(self, attn: Attention, layer_id: int, x: torch.Tensor, qr: torch.Tensor, q: torch.Tensor,
               kv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Store kv, commit compressed entries, select keys, return the sparse attention output `[n, H, D]`."""
        ...


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        dtype = getattr(torch, cfg.dtype)
        self.cfg, self.ratio = cfg, cfg.compress_ratios[layer_id]
        self.n_heads, self.head_dim, self.rope_dim, self.window = cfg.n_heads, cfg.head_dim, cfg.rope_dim, cfg.window

        fp8 = cfg.weight_format != "plain"

        def lin(i: int, o: int) -> nn.Module:
            return make_linear(i, o, dtype, fp8)

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

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: AttentionCache, layer_id: int) -> torch.Tensor:
        """Attention output `[n, dim]` for x `[n, dim]` at `positions`; `cache` owns the keys (see AttentionCache).
        In a compressed layer a cache with a `cos_sin(positions, freqs)` method supplies the RoPE angles (the
        engine's: rows of the cos/sin tables its compressor reads anyway); else they are computed here (a plain
        layer's table would be 256 MB more at V4's 1M positions, for 2 layers of 43)."""
        cached = getattr(cache, "cos_sin", None) if self.ratio else None
        cos, sin = cached(positions, self.freqs) if cached is not None else rope_cos_sin(positions, self.freqs)
        qr, q = self.project_q(x, cos, sin)
        kv = self.project_kv(x, cos, sin)
        o = cache.attend(self, layer_id, x, qr, q, kv, positions, cos, sin)  # [n, H, D]
        return self._output(rms_rope(o, cos, sin, weight=None, eps=None, inverse=True))

    def project_q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(qr `[n, q_lora_rank]`, q `[n, H, D]`): low-rank path, per-head RMS (no weight), RoPE."""
        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))  # [n, H, D]
        return qr, rms_rope(q, cos, sin, weight=None, eps=self.cfg.norm_eps)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The shared latent `[n, D]`: RMSNorm, RoPE, FP8 round trip on the nope dims."""
        return rms_rope(self.wkv(x), cos, sin, weight=self.kv_norm.weight, eps=self.kv_norm.eps,
                        fp8_block=64 if self.cfg.quantize_kv else 0)

    def _output(self, o: torch.Tensor) -> torch.Tensor:
        """Grouped low-rank output: group g of o `[H·D/G]` times its own `[o_lora_rank, H·D/G]` slice of wo_a."""
        groups = self.cfg.o_groups
        mid = grouped_linear(o.reshape(o.shape[0], groups, -1), self.wo_a, groups)  # [n, G*rank]
        return self.wo_b(mid)
