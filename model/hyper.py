"""Manifold-constrained hyper-connections (mHC): the residual stream is hc_mult copies `[hc, dim]`.

Before a sublayer: `mixes = (flatten(x) · rsqrt(mean(x²)+eps)) @ fn^T` split into pre (hc), post (hc)
and comb (hc×hc): `pre = sigmoid(·)+eps`, `post = 2·sigmoid(·)`, `comb = softmax_rows(·)+eps` then
Sinkhorn (columns, then rows and columns alternately, `iters` normalisations in all). The sublayer sees
`Σ_i pre_i x_i`; afterwards `y_j = post_j · f + Σ_i comb_ij x_i` (docs/dsv4-spec.md "Block, MoE and head").

The math lives in kernels/hyper.py: fused Triton kernels on GPU tensors, the plain-PyTorch reference
(bit-identical to this module's former code, batch-invariant) on the CPU.
"""

from __future__ import annotations

import torch

from sparsepd.kernels.hyper import hc_head_fused, hc_post_fused, hc_pre_fused
from sparsepd.kernels.hyper import split_sinkhorn_ref as split_sinkhorn  # noqa: F401  (kept for callers)


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int, eps: float,
           norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sublayer input `[n, dim]` and (post, comb) from the stream x `[n, hc, dim]`."""
    return hc_pre_fused(x, fn, scale, base, iters, eps, norm_eps)


def hc_post(f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """New stream `[n, hc, dim]`: y_j = post_j · f + Σ_i comb_ij · x_i."""
    return hc_post_fused(f, x, post, comb)


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, eps: float,
            norm_eps: float) -> torch.Tensor:
    """Mix the hc copies into one before the final norm: weights sigmoid(mixes·scale + base) + eps."""
    return hc_head_fused(x, fn, scale, base, eps, norm_eps)
