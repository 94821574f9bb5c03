"""Fused mHC (kernels/hyper.py): Triton (interpreter on the CPU at small shapes, real shapes with
SPARSEPD_TEST_GPU=1) against the float64 evaluation of the reference, CPU dispatch bit-exact to the reference.

Error bound. The exact value is the reference evaluated in float64. The reference in the inputs' own
precision (the model's path before the kernels) has an error `err_ref` that we measure, for each output,
as its largest deviation from the exact value over a batch of REF_TOKENS tokens of the same distribution
(the tested tokens are that batch's first n, so a tiny n still gets a stable scale). A second fp32
evaluation of the same formula with other summation orders (the Triton one: split-K GEMM, tree sums) has
an error of the same size, and output rounding adds up to one ulp of the element, so we require
    |triton − exact| ≤ 2 · (err_ref + eps(out dtype) · |exact|)   elementwise.
Measured over 24 seeded cases the worst ratio of the left side to the right side without the 2 was 0.9.
Comparisons are written so that NaN fails them, and every buffer the kernels write starts as NaN.
"""

import math
import os

import pytest
import torch

from sparsepd.kernels import hyper
from sparsepd.kernels.hyper import (
    hc_head_fused,
    hc_head_ref,
    hc_post_fused,
    hc_post_ref,
    hc_pre_fused,
    hc_pre_ref,
)

ON_GPU = os.environ.get("SPARSEPD_TEST_GPU") == "1"
HC, ITERS, EPS, NORM_EPS = 4, 20, 1e-6, 1e-6
REF_TOKENS = 64


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Every buffer the Triton path allocates (outputs and the split-K partials) starts as NaN."""
    monkeypatch.setattr(hyper, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                 device=device))


def make_params(g, dim, head, device):
    """fn ~ N(0, 1/sqrt(hc·dim)) so mixes ~ N(0, 1); scale in [0.5, 1.5), base ~ N(0, 1): Sinkhorn has work."""
    mix, k = (HC, HC * dim) if head else ((2 + HC) * HC, HC * dim)
    fn = torch.randn(mix, k, generator=g) / math.sqrt(k)
    scale = 0.5 + torch.rand(1 if head else 3, generator=g)
    base = torch.randn(mix, generator=g)
    return fn.to(device), scale.to(device), base.to(device)


def make_stream(g, tokens, dim, dtype, device):
    return torch.randn(tokens, HC, dim, generator=g).to(dtype).to(device)


def as64(*tensors):
    return [t.double() for t in tensors]


def assert_close(name, got, approx, exact, n, context):
    """got: Triton on the first n tokens; approx/exact: the reference in low precision/float64 on REF tokens."""
    exact_n = exact[:n]
    assert got.dtype == approx.dtype and got.shape == exact_n.shape, (name, got.dtype, got.shape, context)
    err_ref = (approx.double() - exact).abs().max()
    bound = 2 * (err_ref + torch.finfo(got.dtype).eps * exact_n.abs())
    err = (got.double() - exact_n).abs()
    ok = err <= bound  # NaN compares False
    if not bool(ok.all()):
        worst = (err - bound).nan_to_num(float("inf")).flatten().argmax()
        idx = tuple(int(i) for i in torch.unravel_index(worst, err.shape))
        pytest.fail(f"{name} {context}: {int((~ok).sum())} elements out of bound; worst at {idx}: "
                    f"got {got[idx].item()}, exact {exact_n[idx].item()}, bound {bound[idx].item():.3g} "
                    f"(reference error {err_ref.item():.3g})")


def check_pre(seed, n, dim, dtype, device, backend="triton"):
    g = torch.Generator().manual_seed(seed)
    fn, scale, base = make_params(g, dim, False, device)
    x = make_stream(g, max(n, REF_TOKENS), dim, dtype, device)
    got = hc_pre_fused(x[:n], fn, scale, base, ITERS, EPS, NORM_EPS, backend=backend)
    approx = hc_pre_ref(x, fn, scale, base, ITERS, EPS, NORM_EPS)
    exact = hc_pre_ref(*as64(x, fn, scale, base), ITERS, EPS, NORM_EPS)
    context = f"seed={seed} n={n} hc={HC} dim={dim} dtype={dtype}"
    for name, a, b, c in zip(("sub_input", "post", "comb"), got, approx, exact, strict=True):
        assert_close(name, a, b, c, n, context)
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dim", [64, 96])
@pytest.mark.parametrize("n", [1, 3, 17])
def test_hc_pre_matches_float64_reference(n, dim, dtype, device):
    sub, post, comb = check_pre(10 * n + dim, n, dim, dtype, device)
    assert sub.shape == (n, dim) and post.shape == (n, HC) and comb.shape == (n, HC, HC)
    # Sinkhorn did its work: columns sum to 1 (the last normalisation) and rows nearly so (20 iterations leave
    # up to ~0.025 on these inputs; one column normalisation of the softmax leaves up to ~1)
    assert torch.allclose(comb.sum(-2), torch.ones(n, HC, device=device), atol=1e-5)
    assert torch.allclose(comb.sum(-1), torch.ones(n, HC, device=device), atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dim", [64, 96])
@pytest.mark.parametrize("n", [1, 3, 17])
def test_hc_post_matches_float64_reference(n, dim, dtype, device):
    g = torch.Generator().manual_seed(20 * n + dim)
    fn, scale, base = make_params(g, dim, False, device)
    x = make_stream(g, REF_TOKENS, dim, dtype, device)
    f = torch.randn(REF_TOKENS, dim, generator=g).to(dtype).to(device)
    _, post, comb = hc_pre_ref(x, fn, scale, base, ITERS, EPS, NORM_EPS)  # realistic post and comb
    got = hc_post_fused(f[:n], x[:n], post[:n], comb[:n], backend="triton")
    assert_close("y", got, hc_post_ref(f, x, post, comb), hc_post_ref(*as64(f, x, post, comb)), n,
                 f"n={n} hc={HC} dim={dim} dtype={dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,dim", [(1, 64), (17, 96)])
def test_hc_head_matches_float64_reference(n, dim, dtype, device):
    g = torch.Generator().manual_seed(30 * n + dim)
    fn, scale, base = make_params(g, dim, True, device)
    x = make_stream(g, REF_TOKENS, dim, dtype, device)
    got = hc_head_fused(x[:n], fn, scale, base, EPS, NORM_EPS, backend="triton")
    assert_close("out", got, hc_head_ref(x, fn, scale, base, EPS, NORM_EPS),
                 hc_head_ref(*as64(x, fn, scale, base), EPS, NORM_EPS), n, f"n={n} hc={HC} dim={dim} dtype={dtype}")


def test_empty_batch(device):
    g = torch.Generator().manual_seed(5)
    fn, scale, base = make_params(g, 64, False, device)
    x = make_stream(g, 0, 64, torch.float32, device)
    sub, post, comb = hc_pre_fused(x, fn, scale, base, ITERS, EPS, NORM_EPS, backend="triton")
    assert sub.shape == (0, 64) and post.shape == (0, HC) and comb.shape == (0, HC, HC)
    assert hc_post_fused(sub, x, post, comb, backend="triton").shape == (0, HC, 64)


def test_cpu_dispatch_is_the_reference_bit_for_bit():
    """On CPU tensors "auto" and the model's functions run the reference itself (batch-invariant, bit-exact)."""
    from sparsepd.model import hyper as model_hyper

    g = torch.Generator().manual_seed(6)
    fn, scale, base = make_params(g, 48, False, "cpu")
    x = make_stream(g, 5, 48, torch.float32, "cpu")
    ref = hc_pre_ref(x, fn, scale, base, ITERS, EPS, NORM_EPS)
    for got in (hc_pre_fused(x, fn, scale, base, ITERS, EPS, NORM_EPS),
                model_hyper.hc_pre(x, fn, scale, base, ITERS, EPS, NORM_EPS)):
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    f = torch.randn(5, 48, generator=g)
    assert torch.equal(model_hyper.hc_post(f, x, ref[1], ref[2]), hc_post_ref(f, x, ref[1], ref[2]))
    hfn, hscale, hbase = make_params(g, 48, True, "cpu")
    assert torch.equal(model_hyper.hc_head(x, hfn, hscale, hbase, EPS, NORM_EPS),
                       hc_head_ref(x, hfn, hscale, hbase, EPS, NORM_EPS))


def test_reference_helpers_mirror_model_numerics():
    """kernels/ may not import model/, so the reference mirrors numerics' batch-invariant helpers: keep them equal."""
    from sparsepd.model import numerics

    assert hyper.MIN_ROWS == numerics.MIN_ROWS
    g = torch.Generator().manual_seed(7)
    for rows in (1, 5, 31, 40):
        x, w = torch.randn(rows, 96, generator=g), torch.randn(24, 96, generator=g)
        assert torch.equal(hyper._linear(x, w), numerics.linear(x, w))
        z = torch.randn(rows, 4, 4, generator=g) * 4
        assert torch.equal(hyper._via_f64(torch.sigmoid, z), numerics.sigmoid(z))
        assert torch.equal(hyper._via_f64(lambda t: t.softmax(-1), z), numerics.softmax(z, -1))


def test_bad_inputs_raise(device):
    g = torch.Generator().manual_seed(8)
    fn, scale, base = make_params(g, 64, False, device)
    x = make_stream(g, 3, 64, torch.float32, device)
    with pytest.raises(ValueError, match="fn must be"):
        hc_pre_fused(x, fn[:, :-1], scale, base, ITERS, EPS, NORM_EPS)
    with pytest.raises(ValueError, match="power of two"):
        hc_pre_fused(x[:, :3], fn, scale, base, ITERS, EPS, NORM_EPS)
    with pytest.raises(ValueError, match="iters"):
        hc_pre_fused(x, fn, scale, base, 0, EPS, NORM_EPS)
    with pytest.raises(ValueError, match="fn must be one of"):
        hc_pre_fused(x, fn.half(), scale, base, ITERS, EPS, NORM_EPS, backend="triton")
    with pytest.raises(ValueError, match="contiguous"):
        hc_pre_fused(x.transpose(0, 1).contiguous().transpose(0, 1), fn, scale, base, ITERS, EPS, NORM_EPS,
                     backend="triton")
    _, post, comb = hc_pre_ref(x, fn, scale, base, ITERS, EPS, NORM_EPS)
    with pytest.raises(ValueError, match="comb must be"):
        hc_post_fused(x[:, 0], x, post, comb[:, :, :2])


# --- real shapes on the GPU ---------------------------------------------------------------------------
@pytest.mark.skipif(not ON_GPU, reason="real shapes on the GPU (SPARSEPD_TEST_GPU=1)")
@pytest.mark.parametrize("n", [1, 64, 256, 8192])
def test_real_shapes_bf16(n, device):
    dim = 4096
    sub, post, comb = check_pre(40 + n, n, dim, torch.bfloat16, device)
    g = torch.Generator().manual_seed(50 + n)
    x = make_stream(g, max(n, REF_TOKENS), dim, torch.bfloat16, device)
    f = torch.randn(x.shape[0], dim, generator=g).to(torch.bfloat16).to(device)
    post = torch.cat([post, post[:1].expand(x.shape[0] - n, HC)])
    comb = torch.cat([comb, comb[:1].expand(x.shape[0] - n, HC, HC)])
    got = hc_post_fused(f[:n], x[:n], post[:n], comb[:n])
    assert_close("y", got, hc_post_ref(f, x, post, comb), hc_post_ref(*as64(f, x, post, comb)), n, f"n={n}")
    hfn, hscale, hbase = make_params(g, dim, True, device)
    got = hc_head_fused(x[:n], hfn, hscale, hbase, EPS, NORM_EPS)
    assert_close("head", got, hc_head_ref(x, hfn, hscale, hbase, EPS, NORM_EPS),
                 hc_head_ref(*as64(x, hfn, hscale, hbase), EPS, NORM_EPS), n, f"n={n}")


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need the GPU (SPARSEPD_TEST_GPU=1)")
@pytest.mark.parametrize("n", [1, 64])
def test_cuda_graph_replay_equals_eager(n, device):
    dim = 4096
    g = torch.Generator().manual_seed(60 + n)
    fn, scale, base = make_params(g, dim, False, device)
    hfn, hscale, hbase = make_params(g, dim, True, device)
    x = make_stream(g, n, dim, torch.bfloat16, device)

    def step(x):
        sub, post, comb = hc_pre_fused(x, fn, scale, base, ITERS, EPS, NORM_EPS)
        y = hc_post_fused(sub * 2, x, post, comb)
        return y, hc_head_fused(y, hfn, hscale, hbase, EPS, NORM_EPS)

    static_x = x.clone()
    step(static_x)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(static_x)
    for seed in (1, 2):
        static_x.copy_(make_stream(torch.Generator().manual_seed(seed), n, dim, torch.bfloat16, device))
        graph.replay()
        eager = step(static_x.clone())
        assert all(torch.equal(a, b) for a, b in zip(static_out, eager, strict=True)), seed
        assert all(bool(t.isfinite().all()) for t in static_out)
