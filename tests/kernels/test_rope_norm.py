"""rms_rope (kernels/rope_norm.py): Triton (the interpreter on the CPU at small shapes; the real attention
shapes, bf16 and CUDA-graph replay with SPARSEPD_TEST_GPU=1) against rms_rope_ref, and rms_rope_ref against
the model's own composition (model/numerics.py), bit for bit."""

from __future__ import annotations

import os

import pytest
import torch

from sparsepd.kernels.rope_norm import rms_rope, rms_rope_ref
from sparsepd.model.numerics import apply_rope, fp8_round_trip, rms_norm

GPU = os.environ.get("SPARSEPD_TEST_GPU") == "1" and torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not GPU, reason="needs a CUDA device and SPARSEPD_TEST_GPU=1")
EPS = 1e-6
# what the attention layer asks for: the KV latent, the per-head query, the inverse RoPE of the output,
# plus a weighted norm without FP8 and a plain forward rotation
MODES = {
    "kv": dict(weight=True, eps=EPS, fp8_block=64),
    "q": dict(weight=False, eps=EPS),
    "unrope": dict(weight=False, eps=None, inverse=True),
    "norm_weight": dict(weight=True, eps=EPS),
    "rope": dict(weight=False, eps=None),
}


def make_case(seed: int, n: int, heads: int, d: int, rd: int, dtype: torch.dtype, mode: str, device):
    """x [n, d] (heads = 0) or [n, heads, d] with magnitudes spread over 2^-14 … 2^4 per group of 16 values
    (so FP8 blocks get different scales, tiny ones the 1e-4 floor and e4m3 subnormals), some zeros; cos/sin
    of large angles; the mode's keyword arguments."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, d) if heads == 0 else (n, heads, d)
    spread = 2.0 ** torch.randint(-14, 5, shape[:-1] + (d // 16, 1), generator=g)
    x = (torch.randn(shape[:-1] + (d // 16, 16), generator=g) * spread).flatten(-2)
    x = torch.where(torch.rand(shape, generator=g) < 0.02, 0.0, x)
    angles = torch.rand(n, rd // 2, generator=g, dtype=torch.float64) * 1e4
    cos, sin = angles.cos().float(), angles.sin().float()
    kw = dict(MODES[mode])
    kw["weight"] = (torch.rand(d, generator=g) * 1.5 + 0.25).to(dtype).to(device) if kw["weight"] else None
    return x.to(dtype).to(device), cos.to(device), sin.to(device), kw


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of dtype's values at |v| (fp32 math)."""
    _, e = torch.frexp(v.abs())
    return torch.ldexp(torch.full_like(v, torch.finfo(dtype).eps), e - 1)


def _fp8_at(v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (v / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * scale


def assert_matches_ref(got: torch.Tensor, x, cos, sin, kw, ctx: str) -> None:
    """got equals rms_rope_ref within what the kernel's other summation order can change.

    The kernel sums the squares for the mean in another order than torch, so its fp32 intermediates differ
    by an ulp or two of the row's magnitude: each value may differ by that plus one rounding step of x's
    dtype (a value that lands on the other side of a rounding boundary). The FP8 dims must equal a round
    trip of some input within that distance of the reference's input (same block scale): exactly the
    reference's value, or the neighbouring e4m3 step where the input sits on a rounding boundary."""
    dtype = x.dtype
    want = rms_rope_ref(x, cos, sin, **kw).float()
    got = got.float()
    nonfinite = (~torch.isfinite(got)).nonzero()
    assert nonfinite.numel() == 0, f"{ctx}: non-finite (unwritten?) outputs at {nonfinite[:8].tolist()}"
    row_max = want.abs().amax(-1, keepdim=True)
    tol = _ulp(torch.maximum(got.abs(), want.abs()), dtype) + 4 * torch.finfo(torch.float32).eps * row_max
    rd = 2 * cos.shape[1]
    if kw.get("eps") is not None:
        # The normalised row is rounded to x's dtype before RoPE: where the kernel's and torch's sums put a
        # value on either side of a rounding boundary, the pair (a, b) differs by one step of the dtype, and
        # the rotated pair by up to ulp(a)·|cos| + ulp(b)·|sin| — more than one step of an output smaller than
        # its inputs (a·c − b·s cancels). Seen on the H200 at 8192 bf16 query rows: 28 of 4M values.
        normed = rms_norm(x.float(), None if kw["weight"] is None else kw["weight"].float(), kw["eps"])
        a, b = _ulp(normed.to(dtype).float()[..., -rd:], dtype).unflatten(-1, (-1, 2)).unbind(-1)
        c, s_ = (cos.abs(), sin.abs()) if x.dim() == 2 else (cos.abs()[:, None], sin.abs()[:, None])
        pair = (a * c + b * s_).repeat_interleave(2, -1)
        tol = tol.clone()
        tol[..., -rd:] += pair
    nope = x.shape[-1] - 2 * cos.shape[1] if kw.get("fp8_block") else 0
    err = (got - want).abs()[..., nope:]
    bad = ~(err <= tol[..., nope:])
    assert not bad.any(), (f"{ctx}: {int(bad.sum())} values off, worst {err.max().item():.3g} at "
                           f"{bad.nonzero()[:8].tolist()} (nope offset {nope})")
    if nope:
        block = kw["fp8_block"]
        pre = rms_rope_ref(x, cos, sin, **{**kw, "fp8_block": 0}).float()[..., :nope].unflatten(-1, (-1, block))
        amax = pre.abs().amax(-1, keepdim=True).clamp_min(1e-4) / 448.0
        scale = torch.ldexp(torch.ones_like(amax), torch.frexp(amax)[1] - (torch.frexp(amax)[0] == 0.5).int())
        t = (_ulp(pre, dtype) + 4 * torch.finfo(torch.float32).eps * row_max[..., None])
        lo = _fp8_at(pre - t, scale).to(dtype).float().flatten(-2)
        hi = _fp8_at(pre + t, scale).to(dtype).float().flatten(-2)
        assert torch.equal(_fp8_at(pre, scale).to(dtype).float().flatten(-2), want[..., :nope]), "reference FP8"
        fp8 = got[..., :nope]
        bad = ~((fp8 >= lo) & (fp8 <= hi))
        assert not bad.any(), (f"{ctx}: {int(bad.sum())} FP8 values off, at {bad.nonzero()[:8].tolist()}: "
                               f"got {fp8[bad][:4].tolist()} want {want[..., :nope][bad][:4].tolist()}")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d,rd", [(96, 32), (128, 64)])
@pytest.mark.parametrize("n", [1, 3, 17])
def test_triton_matches_reference(n, d, rd, dtype, mode, device):
    heads = 0 if mode == "kv" else 3  # the KV latent is a row per token, q and o a row per (token, head)
    seed = 1000 * n + d + list(MODES).index(mode)
    x, cos, sin, kw = make_case(seed, n, heads, d, rd, dtype, mode, device)
    out = torch.full_like(x, float("nan"))  # poison: an unwritten value stays NaN
    got = rms_rope(x, cos, sin, **kw, out=out, backend="triton")
    assert got is out
    assert_matches_ref(got.cpu(), x.cpu(), cos.cpu(), sin.cpu(), _cpu(kw),
                       f"seed={seed} n={n} d={d} rd={rd} {dtype} {mode}")


def _cpu(kw: dict) -> dict:
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


@pytest.mark.parametrize("mode", ["kv", "q", "unrope"])
def test_strided_views(mode, device):
    """Rows read from and written into views with padded rows (last dim contiguous), nothing else written;
    the FP8 round trip also with blocks of 32."""
    seed, n, heads, d, rd = 7, 5, 4, 128, 64
    if mode == "kv":  # [n, d] rows of a [n, 2d] tensor
        x, cos, sin, kw = make_case(seed, n, 0, d, rd, torch.float32, mode, device)
        view, kw["fp8_block"] = torch.cat([x, x], -1)[:, d:], 32
        base = torch.full((n, 2 * d), float("nan"), device=device)
        out = base[:, :d]
    else:  # [n, H, d] of a [n, H + 1, d] tensor
        x, cos, sin, kw = make_case(seed, n, heads + 1, d, rd, torch.float32, mode, device)
        view = x[:, :heads]
        base = torch.full((n, heads + 2, d), float("nan"), device=device)
        out = base[:, 1: heads + 1]
    got = rms_rope(view, cos, sin, **kw, out=out, backend="triton")
    assert got is out and int(base.isnan().sum()) == base.numel() - out.numel()
    assert_matches_ref(got.cpu(), view.cpu(), cos.cpu(), sin.cpu(), _cpu(kw), f"seed={seed} strided {mode}")


def test_reference_is_the_models_composition():
    """rms_rope_ref is model/numerics.py's rms_norm → apply_rope → fp8_round_trip of the nope dims, bit for bit."""
    for dtype in (torch.float32, torch.bfloat16):
        x, cos, sin, kw = make_case(3, 9, 0, 128, 64, dtype, "kv", "cpu")
        kv = apply_rope(rms_norm(x, kw["weight"], EPS), cos, sin)
        kv = torch.cat([fp8_round_trip(kv[:, :-64], 64), kv[:, -64:]], dim=-1)
        assert torch.equal(rms_rope_ref(x, cos, sin, **kw), kv)
        q, cos, sin, _ = make_case(4, 9, 5, 128, 64, dtype, "q", "cpu")
        assert torch.equal(rms_rope_ref(q, cos, sin, weight=None, eps=EPS),
                           apply_rope(rms_norm(q, None, EPS), cos, sin))
        assert torch.equal(rms_rope_ref(q, cos, sin, weight=None, eps=None, inverse=True),
                           apply_rope(q, cos, sin, inverse=True))
        assert torch.equal(rms_rope_ref(q, cos, sin, weight=None, eps=None), apply_rope(q, cos, sin))


def test_auto_on_cpu_is_the_reference():
    x, cos, sin, kw = make_case(5, 4, 2, 96, 32, torch.float32, "q", "cpu")
    assert torch.equal(rms_rope(x, cos, sin, **kw), rms_rope_ref(x, cos, sin, **kw))


def test_bad_arguments_are_rejected():
    x, cos, sin, kw = make_case(6, 4, 0, 96, 32, torch.float32, "kv", "cpu")
    with pytest.raises(ValueError, match="eps"):
        rms_rope(x, cos, sin, weight=kw["weight"], eps=None)
    with pytest.raises(ValueError, match="fp8_block"):
        rms_rope(x, cos, sin, weight=None, eps=EPS, fp8_block=48)
    with pytest.raises(ValueError, match="cos and sin"):
        rms_rope(x, cos[:3], sin[:3], weight=None, eps=EPS)
    with pytest.raises(ValueError, match="D must be"):
        rms_rope(torch.zeros(2, 1024), torch.zeros(2, 16), torch.zeros(2, 16), weight=None, eps=EPS)
    with pytest.raises(ValueError, match="cos must be"):
        rms_rope(x, cos.double(), sin, weight=None, eps=EPS)


# --- GPU: the real shapes, bf16, CUDA graphs --------------------------------------------------------------
@gpu_only
@pytest.mark.parametrize("mode", ["kv", "q", "unrope"])
@pytest.mark.parametrize("n", [1, 64, 8192])
def test_gpu_real_shapes_bf16(n, mode):
    heads = 0 if mode == "kv" else 64
    seed = n + list(MODES).index(mode)
    x, cos, sin, kw = make_case(seed, n, heads, 512, 64, torch.bfloat16, mode, "cuda")
    got = rms_rope(x, cos, sin, **kw, out=torch.full_like(x, float("nan")))
    assert_matches_ref(got, x, cos, sin, kw, f"seed={seed} n={n} bf16 {mode} (GPU)")


@gpu_only
def test_gpu_cuda_graph_replay_equals_eager():
    """The three calls of a decode step captured in one graph: replay on new inputs equals eager, bit for bit."""
    n, heads, d, rd = 16, 64, 512, 64
    kv_x, cos, sin, kv_kw = make_case(11, n, 0, d, rd, torch.bfloat16, "kv", "cuda")
    q_x, _, _, q_kw = make_case(12, n, heads, d, rd, torch.bfloat16, "q", "cuda")

    def step():
        return (rms_rope(kv_x, cos, sin, **kv_kw), rms_rope(q_x, cos, sin, **q_kw),
                rms_rope(q_x, cos, sin, weight=None, eps=None, inverse=True))

    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (13, 14):
        new_kv, new_cos, new_sin, _ = make_case(seed, n, 0, d, rd, torch.bfloat16, "kv", "cuda")
        new_q, _, _, _ = make_case(seed + 100, n, heads, d, rd, torch.bfloat16, "q", "cuda")
        for dst, src in ((kv_x, new_kv), (cos, new_cos), (sin, new_sin), (q_x, new_q)):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(outs, step(), strict=True):
            assert torch.equal(got, want), f"seed={seed}: replay differs from eager"
