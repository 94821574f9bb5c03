"""The compressor's projection on a GPU (bf16 activations, fp32 weights as two bf16 parts) against the fp32
product: W is kept to ~2⁻¹⁶ relative, so the rows agree to ~1e-5 relative where a bf16 GEMM of bf16(W)
would be off by ~2⁻⁹."""

import os

import pytest
import torch

from sparsepd.model.compressor import Compressor

GPU = os.environ.get("SPARSEPD_TEST_GPU") == "1" and torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not GPU, reason="needs a CUDA device and SPARSEPD_TEST_GPU=1")


@pytest.mark.parametrize("ratio,n", [(4, 1), (4, 8192), (128, 300)])
def test_split_projection_matches_fp32(ratio, n):
    g = torch.Generator().manual_seed(ratio + n)
    comp = Compressor(4096, 512, 64, ratio, 1e-6, "main", "fp8", torch.bfloat16)
    for w in (comp.wkv.weight, comp.wgate.weight):
        w.copy_(torch.randn(w.shape, generator=g) * 0.02)
    comp = comp.cuda()
    x = torch.randn(n, 4096, generator=g).to(torch.bfloat16).cuda()
    kv, score = comp.project(x)
    for got, w in ((kv, comp.wkv.weight), (score, comp.wgate.weight)):
        want = (x.double() @ w.double().t())
        assert got.dtype == torch.float32 and got.is_contiguous() and got.shape == want.shape
        rel = ((got.double() - want).norm() / want.norm()).item()
        assert rel < 2e-5, rel
    w = comp.wkv.weight
    w.mul_(2.0)  # a weight changed in place: the split is made again
    kv2, _ = comp.project(x)
    assert torch.allclose(kv2, 2 * kv, rtol=1e-5, atol=1e-6)
