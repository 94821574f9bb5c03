"""The lightning indexer of CSA layers (docs/dsv4-spec.md "Indexer").

Queries `q = wq_b · qr` `[Hi, 128]` with RoPE on the last rope dims, a Hadamard rotation and the indexer's
quantization; head weights `w = weights_proj · x · 128^−0.5 · Hi^−0.5`; keys from the indexer's own ratio-4
compressor. Score of entry e for a token: `Σ_h relu(q_h · k_e) · w_h` over the entries it may see
(e < (p+1) // ratio); the top-k positions, sorted by descending score (ties: lower position first).
"""

from __future__ import annotations

import torch
from torch import nn

from sparsepd.kernels.rope_norm import rms_rope
from sparsepd.model.compressor import Compressor, quantize_index_rows
from sparsepd.model.linear import Linear, make_linear
from sparsepd.model.numerics import hadamard_rotate
from sparsepd.model_config import ModelConfig


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig, ratio: int, act_dtype: torch.dtype):
        super().__init__()
        self.n_heads, self.head_dim, self.topk, self.ratio = (
            cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk, ratio)
        self.quantize = cfg.indexer_quant
        self.wq_b = make_linear(cfg.q_lora_rank, self.n_heads * self.head_dim, act_dtype, cfg.weight_format != "plain")
        self.weights_proj = Linear(cfg.dim, self.n_heads, act_dtype)
        self.compressor = Compressor(cfg.dim, self.head_dim, cfg.rope_dim, ratio, cfg.norm_eps, "indexer",
                                     cfg.indexer_quant, act_dtype)

    def rotated_q(self, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Queries `[n, Hi, 128]` fp32 after RoPE and the Hadamard rotation, before quantization."""
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))  # [n, Hi, 128]
        # RoPE alone (no norm): model/numerics.py's apply_rope, one launch on a GPU (kernels/rope_norm.py)
        return hadamard_rotate(rms_rope(q, cos, sin, weight=None, eps=None).float())

    def project_q(self, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Queries after the indexer's quantization round trip `[n, Hi, 128]` fp32."""
        return quantize_index_rows(self.rotated_q(qr, cos, sin), self.quantize)

    def head_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head score weights `[n, Hi]` fp32 (weights_proj · x · 128^−0.5 · Hi^−0.5)."""
        return self.weights_proj(x).float() * (self.head_dim**-0.5 * self.n_heads**-0.5)
