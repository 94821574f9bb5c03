"""rms_norm (kernels/rms_norm.py): Triton (the interpreter on the CPU at small shapes; the model's widths, bf16 and a
CUDA-graph replay with SPARSEPD_TEST_GPU=1) against rms_norm_ref, which is model/numerics.py's rms_norm."""

from __future__ import annotations

import os

import pytest
import torch

from sparsepd.kernels.rms_norm import rms_norm, rms_norm_ref
from sparsepd.model.numerics import rms_norm as numerics_rms_norm

GPU = os.environ.get("SPARSEPD_TEST_GPU") == "1" and torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not GPU, reason="needs a CUDA device and SPARSEPD_TEST_GPU=1")
EPS = 1e-6


def make_case(seed: int, shape: tuple[int, ...], dtype: torch.dtype, weighted: bool, device):
    """x with row magnitudes spread over 2^-12 … 2^6 (a row's scale must not matter), some zeros, and a zero
    row; a weight around 1 in x's dtype (or None)."""
    g = torch.Generator().manual_seed(seed)
    spread = 2.0 ** torch.randint(-12, 7, shape[:-1] + (1,), generator=g)
    x = torch.randn(shape, generator=g) * spread
    x = torch.where(torch.rand(shape, generator=g) < 0.02, 0.0, x)
    if x.shape[0] > 2:
        x[1] = 0.0  # a zero row: rsqrt(eps) times zeros
    w = (torch.rand(shape[-1], generator=g) * 1.5 + 0.25).to(dtype).to(device) if weighted else None
    return x.to(dtype).to(device), w


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of dtype's values at |v| (fp32 math)."""
    _, e = torch.frexp(v.abs())
    return torch.ldexp(torch.full_like(v, torch.finfo(dtype).eps), e - 1)


def assert_matches_ref(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor | None, ctx: str) -> None:
    """got equals rms_norm_ref within what the kernel's other summation order can change: the mean of squares
    differs by an ulp or two in fp32 (relative 4·eps_fp32 of the result), and a value may then round to the
    neighbouring step of x's dtype (one ulp of the larger of the two)."""
    want = rms_norm_ref(x, w, EPS).float()
    got = got.float()
    nonfinite = (~torch.isfinite(got)).nonzero()
    assert nonfinite.numel() == 0, f"{ctx}: non-finite (unwritten?) outputs at {nonfinite[:8].tolist()}"
    tol = _ulp(torch.maximum(got.abs(), want.abs()), x.dtype) + 4 * torch.finfo(torch.float32).eps * want.abs()
    err = (got - want).abs()
    bad = ~(err <= tol)
    assert not bad.any(), (f"{ctx}: {int(bad.sum())} values off, worst {err.max().item():.3g} at "
                           f"{bad.nonzero()[:8].tolist()}")
    if x.dtype == torch.float32:  # no final rounding: fp32 results agree to a few ulps everywhere
        assert (err <= 8 * torch.finfo(torch.float32).eps * want.abs().amax(-1, keepdim=True)).all(), ctx


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(1, 64), (3, 96), (17, 512), (5, 1000), (2, 4096)])
def test_triton_matches_reference(n, d, dtype, weighted, device):
    seed = 100 * n + d + 7 * weighted
    x, w = make_case(seed, (n, d), dtype, weighted, device)
    out = torch.full_like(x, float("nan"))  # poison: an unwritten value stays NaN
    got = rms_norm(x, w, EPS, out=out, backend="triton")
    assert got is out
    assert_matches_ref(got.cpu(), x.cpu(), None if w is None else w.cpu(),
                       f"seed={seed} n={n} d={d} {dtype} w={weighted}")


def test_leading_dims_and_strided_rows(device):
    """[n, hc, d] input, rows read from a view with padded rows, written into a view, nothing else written; a
    non-viewable input (transposed leading dims) goes through a copy."""
    x, w = make_case(3, (4, 3, 128), torch.float32, True, device)
    got = rms_norm(x, w, EPS, backend="triton")
    assert got.shape == x.shape
    assert_matches_ref(got.cpu(), x.cpu(), w.cpu(), "[n, hc, d]")
    wide = torch.cat([x, x], -1)[..., 128:]  # rows of stride 256
    base = torch.full((4, 3, 256), float("nan"), device=device)
    out = base[..., 64:192]
    assert rms_norm(wide, w, EPS, out=out, backend="triton") is out
    assert int(base.isnan().sum()) == base.numel() - out.numel()
    assert_matches_ref(out.cpu(), x.cpu(), w.cpu(), "strided rows")
    t = x.transpose(0, 1)  # [3, 4, 128]: not one row stride
    assert_matches_ref(rms_norm(t, w, EPS, backend="triton").cpu(), t.cpu(), w.cpu(), "transposed leading dims")


def test_rows_do_not_depend_on_the_batch(device):
    """A row's result is the same alone and among 63 others (a token's norm in decode equals its prefill's)."""
    x, w = make_case(9, (64, 256), torch.float16, True, device)
    whole = rms_norm(x, w, EPS, backend="triton")
    for i in (0, 17, 63):
        assert torch.equal(rms_norm(x[i:i + 1], w, EPS, backend="triton"), whole[i:i + 1])


def test_reference_is_the_models_rms_norm():
    for dtype in (torch.float32, torch.bfloat16):
        x, w = make_case(4, (9, 256), dtype, True, "cpu")
        assert torch.equal(rms_norm_ref(x, w, EPS), numerics_rms_norm(x, w, EPS))
        assert torch.equal(rms_norm(x, w, EPS), numerics_rms_norm(x, w, EPS))  # auto on the CPU: the reference
        assert torch.equal(rms_norm(x, None, EPS), numerics_rms_norm(x, None, EPS))


def test_bad_arguments_are_rejected():
    x, w = make_case(6, (4, 96), torch.float32, True, "cpu")
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, w[:10], EPS)
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        rms_norm(x.double(), None, EPS)
    with pytest.raises(ValueError, match="MAX_DIM"):
        rms_norm(torch.zeros(2, 20000), None, EPS)
    with pytest.raises(ValueError, match="out must be like x"):
        rms_norm(x, w, EPS, out=torch.empty(4, 96, dtype=torch.float16))


# --- GPU: the model's widths, bf16, CUDA graphs -------------------------------------------------------------
@gpu_only
@pytest.mark.parametrize("d", [512, 1024, 4096, 7168])
@pytest.mark.parametrize("n", [1, 64, 8192])
def test_gpu_real_shapes_bf16(n, d):
    x, w = make_case(n + d, (n, d), torch.bfloat16, True, "cuda")
    got = rms_norm(x, w, EPS, out=torch.full_like(x, float("nan")))
    assert_matches_ref(got, x, w, f"n={n} d={d} bf16 (GPU)")


@gpu_only
def test_gpu_cuda_graph_replay_equals_eager():
    x, w = make_case(11, (64, 4096), torch.bfloat16, True, "cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        rms_norm(x, w, EPS)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rms_norm(x, w, EPS)
    x.copy_(make_case(12, (64, 4096), torch.bfloat16, True, "cuda")[0])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, rms_norm(x, w, EPS))
