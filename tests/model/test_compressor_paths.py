"""The model's compressor on the GPU goes through the fused kernels (a batch of one request, its ring as
slot 0, pages of one row); that wiring gives the reference path's entries and rings. Checked here with the
kernels' CPU references, which match the model's arithmetic bit for bit."""

import pytest
import torch

from sparsepd.model.compressor import Compressor
from sparsepd.model.numerics import rope_freqs
from sparsepd.model.state import CompressorRing


@pytest.mark.parametrize("ratio,d,output", [(4, 96, "main"), (16, 96, "main"), (4, 128, "indexer")])
def test_kernel_wiring_equals_reference(ratio, d, output):
    torch.manual_seed(ratio + d)
    comp = Compressor(32, d, 32, ratio, 1e-6, output, "fp8", torch.float32)
    with torch.no_grad():
        for p in comp.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 and p.shape[0] == d else 0.0))
    freqs = rope_freqs(32, 160000.0, 0, 1.0, 32, 1)
    cpu = torch.device("cpu")
    ring_a, ring_b = CompressorRing.fresh(ratio, d, cpu), CompressorRing.fresh(ratio, d, cpu)
    start = 0
    for n in (3, 1, ratio * 2 + 1, 1, 1, 5 * ratio - 2, 1):
        kv, score = comp.project(torch.randn(n, 32))
        want = comp.commit(kv, score, start, ring_a, freqs)
        got = comp._commit_with_kernels(kv, score, start, ring_b, freqs)
        assert torch.equal(got, want), (start, n)
        assert torch.equal(ring_a.kv, ring_b.kv) and torch.equal(ring_a.score, ring_b.score), (start, n)
        start += n
