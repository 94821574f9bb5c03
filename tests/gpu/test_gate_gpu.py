"""The MoE gate's linear on the GPU (model/moe.py `gate_logits`): bf16 x and weight through one bf16 GEMM that
accumulates and writes fp32, against float64 and against the fp32 GEMM of the widened operands it replaced."""

from __future__ import annotations

import os

import pytest
import torch

from sparsepd.model.moe import gate_logits

pytestmark = pytest.mark.skipif(os.environ.get("SPARSEPD_TEST_GPU") != "1" or not torch.cuda.is_available(),
                                reason="needs a CUDA device and SPARSEPD_TEST_GPU=1")


@pytest.mark.parametrize("n,dim,experts", [(1, 4096, 256), (128, 4096, 256), (8192, 4096, 256), (64, 7168, 384)])
def test_gate_logits_within_fp32_accumulation_of_float64(n, dim, experts):
    """Each logit within dim · 2^-24 · Σ|x·w| of float64 (the worst case of an fp32 sum of dim exact products), and
    its largest error over the whole output at most 4× the fp32 GEMM's (the same sums in another order)."""
    g = torch.Generator(device="cuda").manual_seed(n + dim)
    x = torch.randn(n, dim, device="cuda", generator=g).bfloat16()
    w = (torch.randn(experts, dim, device="cuda", generator=g) * dim ** -0.5).bfloat16()
    got = gate_logits(x, w)
    assert got.dtype == torch.float32 and got.shape == (n, experts)
    exact = x.double() @ w.double().t()
    bound = dim * 2.0 ** -24 * (x.double().abs() @ w.double().abs().t())
    err = (got.double() - exact).abs()
    assert (err <= bound).all(), float((err / bound).max())
    old = (x.float() @ w.float().t()).double()
    assert err.max() <= 4 * max(float((old - exact).abs().max()), 2.0 ** -40), (float(err.max()),
                                                                                 float((old - exact).abs().max()))
