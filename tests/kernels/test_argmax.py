"""argmax_rows (kernels/argmax.py): Triton (the interpreter on the CPU; the real vocabulary and batch 1–256 with
SPARSEPD_TEST_GPU=1, fp32 and bf16) against torch.argmax, index for index: the kernel only compares values, so any
difference is a bug, not rounding. Inputs are built to hit every rule: ties inside a chunk and across chunks, the
maximum in the last partial chunk, ±inf, NaN (the first NaN wins, as in torch), rows of −inf."""

from __future__ import annotations

import os

import pytest
import torch

from sparsepd.kernels.argmax import CHUNK, argmax_rows, argmax_rows_ref

GPU = os.environ.get("SPARSEPD_TEST_GPU") == "1" and torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not GPU, reason="needs a CUDA device and SPARSEPD_TEST_GPU=1")
POISON = -7  # an index no row can have: every output must be written


def make_logits(seed: int, B: int, V: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, V] logits: random rows, and (cycling over the rows) a tie of the maximum in two chunks, a tie inside one
    block, the maximum at the last column, +inf twice, NaN twice after an +inf, a row of −inf, a constant row, a
    row quantized to few values (many ties)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g) * 4
    for b in range(B):
        kind = b % 8
        if kind == 0 and V > 2:  # the same maximum in (up to) two chunks: the first wins
            i, j = int(torch.randint(0, V // 2, (1,), generator=g)), V // 2 + int(torch.randint(0, V - V // 2, (1,),
                                                                                                 generator=g))
            x[b, i] = x[b, j] = 100.0
        elif kind == 1:
            x[b, V - 1] = 100.0
        elif kind == 2 and V > 3:
            x[b, 1] = x[b, V - 2] = float("inf")
        elif kind == 3 and V > 4:
            x[b, 0] = float("inf")
            x[b, V - 3] = x[b, 2] = float("nan")
        elif kind == 4:
            x[b] = float("-inf")
        elif kind == 5:
            x[b] = 0.5
        elif kind == 6:
            x[b] = (x[b] / 4).round()  # values in a few integers: the maximum repeats
    return x.to(dtype)


def run_poisoned(x: torch.Tensor) -> torch.Tensor:
    out = torch.full((x.shape[0],), POISON, dtype=torch.int64, device=x.device)
    got = argmax_rows(x, out=out, backend="triton")
    assert got.data_ptr() == out.data_ptr()
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,V", [(1, 1), (3, 5), (8, 1000), (9, CHUNK), (8, CHUNK + 1), (16, 3 * CHUNK - 123)])
def test_triton_matches_torch(B, V, dtype, device):
    x = make_logits(B * 1000 + V, B, V, dtype).to(device)
    got = run_poisoned(x)
    want = x.cpu().argmax(-1)
    assert torch.equal(got.cpu(), want), f"B={B} V={V} {dtype}: rows {(got.cpu() != want).nonzero().flatten().tolist()}"


def test_strided_rows(device):
    """A row stride wider than V (a view of the first V columns)."""
    wide = make_logits(5, 8, 2 * CHUNK + 50, torch.float32).to(device)
    x = wide[:, : CHUNK + 17]
    assert torch.equal(run_poisoned(x).cpu(), x.cpu().argmax(-1))


def test_auto_on_cpu_is_the_reference():
    x = make_logits(1, 4, 300, torch.float32)
    assert torch.equal(argmax_rows(x), x.argmax(-1))
    assert torch.equal(argmax_rows_ref(x, out=torch.empty(4, dtype=torch.int64)), x.argmax(-1))


def test_empty_batch(device):
    x = torch.empty((0, 50), device=device)
    assert argmax_rows(x, backend="triton").shape == (0,)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="fp32/bf16/fp16"):
        argmax_rows(torch.zeros(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="fp32/bf16/fp16"):
        argmax_rows(torch.zeros(4))
    with pytest.raises(ValueError, match="columns"):
        argmax_rows(torch.zeros(3, 0))
    with pytest.raises(ValueError, match="contiguous"):
        argmax_rows(torch.zeros(4, 3).t())
    with pytest.raises(ValueError, match="int64"):
        argmax_rows(torch.zeros(3, 4), out=torch.zeros(3, dtype=torch.int32))


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 8, 64, 128, 256])
def test_gpu_vocabulary(B, dtype):
    """The presets' vocabulary (129,280) at the decode batches, and inside a CUDA graph replayed on new logits."""
    V = 129_280
    x = make_logits(B, B, V, dtype).cuda()
    assert torch.equal(run_poisoned(x), x.argmax(-1))
    static = x.clone()
    out = torch.full((B,), POISON, dtype=torch.int64, device="cuda")
    argmax_rows(static, out=out)  # warm-up outside the capture (compiles)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        argmax_rows(static, out=out)
    for seed in (1, 2):
        static.copy_(make_logits(B + seed * 7, B, V, dtype).cuda()[torch.randperm(B)])
        out.fill_(POISON)
        graph.replay()
        assert torch.equal(out, static.argmax(-1)), f"replay {seed}"
