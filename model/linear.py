"""The model's projection layers: plain (the weight in the model's dtype) or FP8 (the weight kept as the checkpoint
stores it: e4m3 with one fp32 scale per 128×128 tile, multiplied by `kernels.fp8_gemm.fp8_linear`, which quantizes
the activations per 1×128 block on the fly and accumulates in fp32, as DeepSeek's reference inference does).

Which projections are FP8 is the V4 checkpoint's layout (`FP8_PROJECTIONS`, checked by model/weights.py's loader):
attention wq_a, wq_b, wkv, wo_a, wo_b, the indexer's wq_b and the shared experts; the routed experts are FP4
(model/moe.py); the embedding, head, gate, indexer weights_proj, compressors and norms are plain.

Both layers are batch-invariant on the CPU (a token's result does not depend on how many rows share the call:
model/numerics.py), so chunked prefill and decode reproduce one prefill there too.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from sparsepd.kernels.fp8_gemm import BLOCK, fp8_linear, fp8_linear_grouped
from sparsepd.model.numerics import MIN_ROWS, linear

FP8_PROJECTIONS = re.compile(r"(\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|\.indexer\.wq_b|\.shared_experts\.w[123])\.weight$")
ROUTED_EXPERTS = re.compile(r"\.ffn\.experts\.\d+\.w[123]\.weight$")


class Linear(nn.Module):
    """y = x · Wᵀ with W `[out, in]` in the model's dtype (output in that dtype)."""

    def __init__(self, in_dim: int, out_dim: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_dim, in_dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class Fp8Linear(nn.Module):
    """y = x · Wᵀ with W `[out, in]` FP8 e4m3 and `scale` `[⌈out/128⌉, ⌈in/128⌉]` fp32 (the checkpoint's
    `.weight` and `.scale`); x is cast to `act_dtype` first, y comes out in it."""

    def __init__(self, in_dim: int, out_dim: int, act_dtype: torch.dtype):
        super().__init__()
        self.act_dtype = act_dtype
        self.weight = nn.Parameter(torch.zeros(out_dim, in_dim, dtype=torch.float8_e4m3fn), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(math.ceil(out_dim / BLOCK), math.ceil(in_dim / BLOCK)),
                                  requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_rows(x.to(self.act_dtype), self.weight, self.scale)

    def dequantized(self) -> torch.Tensor:
        """W as fp32 `[out, in]` (exact)."""
        full = self.scale.repeat_interleave(BLOCK, 0)[: self.weight.shape[0]]
        return self.weight.float() * full.repeat_interleave(BLOCK, 1)[:, : self.weight.shape[1]]


def fp8_rows(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`fp8_linear` over the last dim, padded to MIN_ROWS rows on the CPU (batch invariance, as `linear`)."""
    lead, k = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, k)
    n = flat.shape[0]
    if flat.device.type == "cpu" and n < MIN_ROWS:
        flat = torch.cat([flat, flat.new_zeros(MIN_ROWS - n, k)])
    return fp8_linear(flat, weight, scale)[:n].reshape(*lead, weight.shape[0])


def make_linear(in_dim: int, out_dim: int, dtype: torch.dtype, fp8: bool) -> Linear | Fp8Linear:
    return Fp8Linear(in_dim, out_dim, dtype) if fp8 else Linear(in_dim, out_dim, dtype)


def grouped_linear(x: torch.Tensor, layer: Linear | Fp8Linear, groups: int) -> torch.Tensor:
    """The grouped output projection: group g of x `[n, G, in/G]` times rows g·r … (g+1)·r of the layer's weight
    `[G·r, in/G]` → `[n, G·r]` (docs/dsv4-spec.md "Attention layer", step 7).

    FP8: on the GPU with r a multiple of 128 (V4: 1024), one `fp8_linear_grouped` launch; otherwise one
    fp8_linear a group over the weight's rows from the tile that holds row g·r to the one that holds row
    (g+1)·r − 1 (its own scale rows), keeping the group's r columns of the result."""
    n = x.shape[0]
    if isinstance(layer, Linear):
        rank = layer.weight.shape[0] // groups
        w = layer.weight.view(groups, rank, -1)
        if x.is_cuda:  # one batched GEMM instead of G launches
            return torch.bmm(x.transpose(0, 1).to(w.dtype), w.transpose(1, 2)).transpose(0, 1).flatten(1)
        return torch.cat([linear(x[:, g], w[g]) for g in range(groups)], dim=-1)  # [n, G*rank]
    rank = layer.weight.shape[0] // groups
    if x.is_cuda and rank % BLOCK == 0:  # one launch for the G products (8 at decode cost 8 launches and quantizers)
        return fp8_linear_grouped(x.to(layer.act_dtype), layer.weight, layer.scale)
    outs = []
    for g in range(groups):
        first, last = g * rank // BLOCK, ((g + 1) * rank - 1) // BLOCK  # the tiles the group's rows lie in
        rows = slice(first * BLOCK, min((last + 1) * BLOCK, layer.weight.shape[0]))
        y = fp8_rows(x[:, g].to(layer.act_dtype), layer.weight[rows], layer.scale[first: last + 1])
        outs.append(y[:, g * rank - rows.start: (g + 1) * rank - rows.start])
    return torch.cat(outs, dim=-1).reshape(n, groups * rank)
