"""Manifold-constrained hyper-connections (mHC): the residual stream is hc_mult copies `[hc, dim]`.

Before a sublayer: `mixes = (flatten(x) · rsqrt(mean(x²)+eps)) @ fn^T` split into pre (hc), post (hc)
and comb (hc×hc): `pre = sigmoid(·)+eps`, `post = 2·sigmoid(·)`, `comb = softmax_rows(·)+eps` then
Sinkhorn (columns, then rows and columns alternately, `iters` normalisations in all). The sublayer sees
`Σ_i pre_i x_i`; afterwards `y_j = post_j · f + Σ_i comb_ij x_i` (dsv4-spec.md "Block, MoE and head").
"""

from __future__ import annotations

import torch

from sparsepd.model.numerics import linear, sigmoid, softmax


def split_sinkhorn(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, iters: int,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pre `[n, hc]`, post `[n, hc]`, comb `[n, hc, hc]` from mixes `[n, (2+hc)·hc]` fp32."""
    pre = sigmoid(mixes[:, :hc] * scale[0] + base[:hc]) + eps
    post = 2 * sigmoid(mixes[:, hc: 2 * hc] * scale[1] + base[hc: 2 * hc])
    logits = mixes[:, 2 * hc:].unflatten(-1, (hc, hc)) * scale[2] + base[2 * hc:].view(hc, hc)
    comb = softmax(logits, -1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return pre, post, comb


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int, eps: float,
           norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sublayer input `[n, dim]` and (post, comb) from the stream x `[n, hc, dim]`."""
    flat = x.flatten(1).float()
    mixes = linear(flat, fn) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
    pre, post, comb = split_sinkhorn(mixes, scale, base, x.shape[1], iters, eps)
    return (pre[:, :, None] * x.float()).sum(1).to(x.dtype), post, comb


def hc_post(f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """New stream `[n, hc, dim]`: y_j = post_j · f + Σ_i comb_ij · x_i."""
    y = post[:, :, None] * f.float()[:, None, :] + (comb[:, :, :, None] * x.float()[:, :, None, :]).sum(1)
    return y.to(x.dtype)


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, eps: float,
            norm_eps: float) -> torch.Tensor:
    """Mix the hc copies into one before the final norm: weights sigmoid(mixes·scale + base) + eps."""
    flat = x.flatten(1).float()
    mixes = linear(flat, fn) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
    pre = sigmoid(mixes * scale + base) + eps
    return (pre[:, :, None] * x.float()).sum(1).to(x.dtype)
