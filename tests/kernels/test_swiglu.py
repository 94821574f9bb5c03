"""silu_mul (kernels/swiglu.py): Triton (the interpreter on the CPU; bf16 at the shared expert's shapes with
SPARSEPD_TEST_GPU=1) against silu_mul_ref, and silu_mul_ref against model/moe.py's former composition with
model/numerics.py's silu, bit for bit."""

from __future__ import annotations

import os

import pytest
import torch

from sparsepd.kernels.swiglu import silu_mul, silu_mul_ref
from sparsepd.model.numerics import silu

GPU = os.environ.get("SPARSEPD_TEST_GPU") == "1" and torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not GPU, reason="needs a CUDA device and SPARSEPD_TEST_GPU=1")
LIMIT = 10.0  # the presets' swiglu_limit


def make_case(seed: int, n: int, inter: int, dtype: torch.dtype, weighted: bool, device):
    """gate, up [n, inter] of magnitudes up to ~40 (both sides of ±LIMIT), some exactly ±LIMIT, zeros and
    NaNs; weights [n, 1] fp32 as a column view of [n, 3] (a row stride of 3) or None."""
    g = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(n, inter, generator=g) * 2.0 ** torch.randint(-3, 5, (n, inter), generator=g)
                for _ in range(2))
    for t in (gate, up):
        pick = torch.rand(n, inter, generator=g)
        t[pick < 0.02] = LIMIT
        t[(pick >= 0.02) & (pick < 0.04)] = -LIMIT
        t[(pick >= 0.04) & (pick < 0.05)] = 0.0
        t[(pick >= 0.05) & (pick < 0.052)] = float("nan")
    weights = (torch.rand(n, 3, generator=g) + 0.05)[:, 1:2] if weighted else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(gate.to(dtype)), to(up.to(dtype)), to(weights)


def assert_matches_ref(got: torch.Tensor, gate, up, limit, weights, ctx: str, gpu: bool = False) -> None:
    """got against silu_mul_ref on the CPU (silu in float64 rounded once to fp32, then the fp32 products), NaN
    where the reference has NaN.

    From the interpreter (gpu False): bit for bit, but for at most 1 value in 10^5, which may be one step of the
    output's format off. Both evaluate the same fp32 expression in the same order with one rounding at the end;
    the exception is silu itself: both take it in float64 (the kernel through numpy's exp, the reference through
    torch's) and round it to fp32, and two float64 results an ulp apart can straddle an fp32 rounding boundary.

    From the GPU (gpu True): the kernel's silu is fp32 libdevice expf (≤ 2 ulp: ≤ 2·eps relative) and an IEEE
    division, then one or two fp32 products: ≤ 3.5·eps relative from exact; the reference's ≤ 1.5·eps. An fp32
    output is within 5·eps·|want|; a bf16/fp16 output is the same fp32 value rounded once, so within one step of
    its format, and off by that step only where the fp32 values straddle a rounding boundary (~2^-8 of values for
    fp16, less for bf16: at most 1% here). Bit-for-bit equality with torch's own CUDA silu in bf16, the model's
    format, is test_gpu_bitwise_equal's."""
    want = silu_mul_ref(gate, up, limit, weights).float()
    got = got.float()
    assert torch.equal(got.isnan(), want.isnan()), (
        f"{ctx}: NaN mismatch at {(got.isnan() ^ want.isnan()).nonzero()[:8].tolist()} (unwritten outputs are NaN)")
    got, want = got.nan_to_num(), want.nan_to_num()
    differ = got != want
    _, e = torch.frexp(want.abs())
    step = torch.ldexp(torch.full_like(want, torch.finfo(gate.dtype).eps), e - 1)  # one step of gate's dtype at |want|
    if gpu and gate.dtype == torch.float32:
        far, cap = (got - want).abs() > 5 * torch.finfo(torch.float32).eps * want.abs(), want.numel()
    else:
        far, cap = (got - want).abs() > step, want.numel() // (100 if gpu else 100_000)
    assert not far.any() and int(differ.sum()) <= cap, (
        f"{ctx}: {int(differ.sum())} values differ ({int(far.sum())} by more than a step), at "
        f"{differ.nonzero()[:8].tolist()}: got {got[differ][:4].tolist()} want {want[differ][:4].tolist()}")


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("limit", [LIMIT, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,inter", [(1, 48), (7, 2048 + 17), (64, 512)])
def test_triton_matches_reference(n, inter, dtype, limit, weighted, device):
    seed = 1000 * n + inter + 10 * [torch.float32, torch.float16, torch.bfloat16].index(dtype) + 2 * int(weighted)
    gate, up, weights = make_case(seed, n, inter, dtype, weighted, device)
    out = torch.full_like(gate, float("nan"))  # poison: an unwritten value stays NaN
    got = silu_mul(gate, up, limit, weights, out=out, backend="triton")
    assert got is out
    assert_matches_ref(got.cpu(), gate.cpu(), up.cpu(), limit, None if weights is None else weights.cpu(),
                       f"seed={seed} n={n} inter={inter} {dtype} limit={limit} weighted={weighted}",
                       gpu=got.is_cuda)


def test_strided_rows(device):
    """gate and up as the two halves of one [n, 2·inter] GEMM output, out rows of a wider tensor: nothing else
    written."""
    n, inter = 5, 96
    gate, up, weights = make_case(3, n, inter, torch.bfloat16, True, device)
    fused = torch.cat([gate, up], dim=1)
    base = torch.full((n, inter + 8), float("nan"), dtype=torch.bfloat16, device=device)
    got = silu_mul(fused[:, :inter], fused[:, inter:], LIMIT, weights, out=base[:, 4:4 + inter], backend="triton")
    assert int(base.isnan().sum()) == n * 8 + int(got.isnan().sum())
    assert_matches_ref(got.cpu(), gate.cpu(), up.cpu(), LIMIT, weights.cpu(), "strided rows", gpu=got.is_cuda)
    assert silu_mul(gate[:0], up[:0], LIMIT, backend="triton").shape == (0, inter)


def test_reference_is_the_models_composition():
    """silu_mul_ref is what model/moe.py's swiglu computed between the GEMMs (with model/numerics.py's silu),
    bit for bit: the CPU path is unchanged."""
    for dtype in (torch.float32, torch.bfloat16):
        for weighted in (False, True):
            gate, up, weights = make_case(5, 9, 160, dtype, weighted, "cpu")
            g, u = gate.float().clamp(max=LIMIT), up.float().clamp(-LIMIT, LIMIT)
            h = silu(g) * u
            h = weights * h if weighted else h
            assert torch.equal(silu_mul_ref(gate, up, LIMIT, weights).nan_to_num(), h.to(dtype).nan_to_num())


def test_auto_on_cpu_is_the_reference():
    gate, up, weights = make_case(6, 4, 64, torch.bfloat16, True, "cpu")
    assert torch.equal(silu_mul(gate, up, LIMIT, weights).nan_to_num(),
                       silu_mul_ref(gate, up, LIMIT, weights).nan_to_num())


def test_bad_arguments_are_rejected():
    gate, up, weights = make_case(7, 4, 64, torch.float32, True, "cpu")
    with pytest.raises(ValueError, match="up must be like gate"):
        silu_mul(gate, up.half(), LIMIT)
    with pytest.raises(ValueError, match="weights must be"):
        silu_mul(gate, up, LIMIT, weights.double())
    with pytest.raises(ValueError, match="contiguous last dim"):
        silu_mul(gate.t(), up.t(), LIMIT)
    with pytest.raises(ValueError, match="gate must be"):
        silu_mul(gate.long(), up.long(), LIMIT)


@gpu_only
@pytest.mark.parametrize("n,inter", [(1, 2048), (64, 3072), (8192, 2048)])
def test_gpu_bitwise_equal(n, inter):
    """On the GPU the kernel evaluates torch's CUDA expression (expf, IEEE division, unfused products): equal."""
    gate, up, weights = make_case(n + inter, n, inter, torch.bfloat16, n == 64, "cuda")
    got = silu_mul(gate, up, LIMIT, weights, out=torch.full_like(gate, float("nan")))
    assert torch.equal(got.nan_to_num(), silu_mul_ref(gate, up, LIMIT, weights).nan_to_num())
