"""kernels/fp8_gemm.py: activation quantization, the FP8 block-scaled GEMM and its reference.

Ground truth is float64. Two separate errors are checked, each against a bound derived from the formats:
- quantization (the reference against x·W^T with x unquantized): each x becomes q·s with |q·s − x| ≤ 2^−4·|x|
  (e4m3 keeps 3 mantissa bits: half an ulp) or ≤ 2^−10·s in e4m3's subnormal range, so
  |y_ref − y| ≤ Σ_k (2^−4·|x_k| + 2^−10·s_x) · |w_k| plus the output's rounding;
- arithmetic (kernel and reference against the fp64 product of the same quantized operands): the output's
  rounding to x's dtype (≤ half an ulp, 2^−8 relative for bf16) plus the accumulation, bounded by
  c · Σ_k |q_x·s_x|·|q_w·s_w| with c = 2^−20 in the interpreter (fp32 sums of ≤ 2^10 terms) and 2^−9 on Hopper,
  whose FP8 MMA adds each 32-deep partial product into its accumulator with ~13 kept fraction bits (truncated:
  DeepSeek-V3 report §3.3.2). The kernel starts a fresh product every 128-block and adds it in fp32, so that
  truncation spans 4 MMA steps. An emulation of it on these inputs (K = 512-8192, 128×128 outputs, 3 seeds) gave a
  worst error of 1.3·2^−10 of Σ|terms| with a fresh product every 128-block (2^−9 leaves 1.5× margin), 2^−14 with
  one every 32, and 2^−5 with one accumulator over all of K, as the earlier rescaled accumulator had: the cause of
  the first GPU run's prefill failures against the 2^−10 bound that was derived for it. A mis-scaled 128-block errs
  by a power of two times its share of the sum, far past the bound; the interpreter's 2^−20 sees a dropped one.
On CPU the kernels run in the Triton interpreter (its dot takes FP8 operands); with SPARSEPD_TEST_GPU=1 the GPU
tests run bf16 activations at V4-Flash's projection shapes.
"""

import dataclasses
import os

import pytest
import torch

from sparsepd.kernels import fp8_gemm
from sparsepd.kernels.fp8_gemm import (
    _CONFIG_TABLE,
    BLOCK,
    Fp8GemmConfig,
    act_quant,
    act_quant_ref,
    default_fp8_config,
    dequant_fp8_block,
    fp8_linear,
    fp8_linear_grouped,
    fp8_linear_ref,
    to_fnuz,
)

ON_GPU = os.environ.get("SPARSEPD_TEST_GPU") == "1"
needs_gpu = pytest.mark.skipif(not ON_GPU or not torch.cuda.is_available(),
                               reason="needs a CUDA device and SPARSEPD_TEST_GPU=1")
OUT_ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
ACC_BOUND = 2.0**-9 if ON_GPU else 2.0**-20

# configs that reach every code path at small shapes: fused quantizer, split-K (the last program reduces), the
# swapped product, grouped program order, tiles smaller and larger than M; then one config of each shape class of
# the default table (decode M ≤ 16, decode M ≤ 64, mid, prefill) as the GPU runs it
CONFIGS = [
    Fp8GemmConfig(16, 32, quant_a=True),
    Fp8GemmConfig(16, 64, split_k=3, quant_a=True, swap_ab=True),
    Fp8GemmConfig(32, 128, split_k=2),
    Fp8GemmConfig(16, 16, group_m=2),
    Fp8GemmConfig(32, 64, split_k=2, swap_ab=True),
    *(c for _, row in _CONFIG_TABLE for c in row),
]


def make_weight(seed, N, K, fp8=torch.float8_e4m3fn, device="cpu"):
    """Random FP8 tiles (values across e4m3's range, subnormals included) and power-of-two scales."""
    g = torch.Generator().manual_seed(seed)
    top = float(torch.finfo(fp8).max)
    w = (torch.randn(N, K, generator=g) * top / 4).clamp(-top, top).to(fp8)
    scale = torch.exp2(torch.randint(-12, -4, (-(-N // BLOCK), -(-K // BLOCK)), generator=g).float())
    return w.to(device), scale.to(device)


def make_x(seed, shape, dtype, device="cpu"):
    """Activations whose 128-blocks differ in magnitude (2^±6), one block all zero where K allows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    K = shape[-1]
    block_mag = torch.exp2(torch.randint(-6, 7, (-(-K // BLOCK),), generator=g).float())
    x = x * block_mag.repeat_interleave(BLOCK)[:K]
    if K > BLOCK:
        x[..., BLOCK:2 * BLOCK] = 0
    return x.to(device, dtype)


def dequant_act(q, s):
    return q.double() * s.double().repeat_interleave(BLOCK, -1)[..., :q.shape[-1]]


def truth_and_magnitude(x, weight, weight_scale):
    """fp64 product of the quantized operands, and Σ_k |x_k·w_k| (the accumulation bound's scale)."""
    q, s = act_quant_ref(x) if weight.dtype == torch.float8_e4m3fn else _fnuz_act(x)
    xd, wd = dequant_act(q, s), dequant_fp8_block(weight, weight_scale).double()
    return xd @ wd.T, xd.abs() @ wd.abs().T


def _fnuz_act(x):
    from sparsepd.kernels.fp8_gemm import _quant_ref
    return _quant_ref(x, BLOCK, torch.float8_e4m3fnuz)


def check_arithmetic(got, x, weight, weight_scale, what):
    truth, mag = truth_and_magnitude(x, weight, weight_scale)
    got = got.double().reshape(truth.shape)
    bound = OUT_ULP[x.dtype] * truth.abs() + ACC_BOUND * mag + 1e-30
    excess = (got - truth).abs() - bound
    worst = excess.flatten().argmax().item()
    assert torch.isfinite(got).all(), f"{what}: non-finite output at {(~torch.isfinite(got)).nonzero()[:5].tolist()}"
    assert excess.max() <= 0, (
        f"{what}: |got − truth| exceeds the bound at [m, n] = {divmod(worst, truth.shape[1])}: got "
        f"{got.flatten()[worst].item()}, want {truth.flatten()[worst].item()}, bound {bound.flatten()[worst].item()}")


# --- activation quantization ------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1), (3, 128), (5, 300), (2, 3, 129)])
def test_act_quant_ref_properties(shape):
    x = make_x(sum(shape), shape, torch.float32)
    q, s = act_quant_ref(x)
    K = shape[-1]
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (*shape[:-1], -(-K // BLOCK))
    mantissa, _ = torch.frexp(s)
    assert (mantissa == 0.5).all(), "scales must be powers of two (ue8m0)"
    assert q.float().abs().max() <= 448
    full = s.repeat_interleave(BLOCK, -1)[..., :K]
    err = (dequant_act(q, s) - x.double()).abs()
    assert (err <= 2.0**-4 * x.double().abs() + 2.0**-10 * full.double()).all(), "beyond half an e4m3 ulp"
    # the scale is the smallest power of two that fits the block's amax (or the 1e-4 floor)
    amax = torch.nn.functional.pad(x.abs(), (0, s.shape[-1] * BLOCK - K)).unflatten(-1, (-1, BLOCK)).amax(-1)
    floor = amax.clamp_min(1e-4) / 448
    assert (s >= floor).all() and (s / 2 < floor).all()
    if K > BLOCK:
        assert (q[..., BLOCK:2 * BLOCK].float() == 0).all() and (s[..., 1] == 2.0**-22).all(), "zero block"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 5), (3, 300), (17, 129), (2, 3, 256)])
def test_act_quant_triton_is_the_reference_bit_for_bit(shape, dtype, device):
    x = make_x(7 + sum(shape), shape, dtype, device)
    if shape[-1] >= 256:
        x[..., 0, 200] = float("nan")  # its block's bytes are NaN and its scale NaN, like the reference
        x[..., -1, 10] = float("inf")
    q, s = act_quant(x, backend="triton")
    q_ref, s_ref = act_quant_ref(x)
    bad = (q.view(torch.uint8) != q_ref.view(torch.uint8)).nonzero()
    assert bad.numel() == 0, f"{shape} {dtype}: q differs at {bad[:8].tolist()}"
    assert torch.equal(s.isnan(), s_ref.isnan()) and torch.equal(s.nan_to_num(), s_ref.nan_to_num()), (
        f"{shape} {dtype}: scales differ at {(s != s_ref).nonzero()[:8].tolist()}")


# --- the GEMM ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M, N, K", [(1, 17, 128), (5, 200, 300), (40, 129, 512)])
def test_reference_against_float64(M, N, K, dtype):
    x = make_x(M + N + K, (M, K), dtype)
    weight, scale = make_weight(M * N, N, K)
    y = fp8_linear_ref(x, weight, scale)
    assert y.dtype == dtype and y.shape == (M, N)
    check_arithmetic(y, x, weight, scale, f"reference M={M} N={N} K={K} {dtype}")
    # the quantization error against the product of the unquantized x, within its derived bound
    wd = dequant_fp8_block(weight, scale).double()
    exact = x.double() @ wd.T
    _, s = act_quant_ref(x)
    per_x = 2.0**-4 * x.double().abs() + 2.0**-10 * s.double().repeat_interleave(BLOCK, -1)[:, :K]
    bound = per_x @ wd.abs().T + OUT_ULP[dtype] * exact.abs() + 1e-30
    assert ((y.double() - exact).abs() <= bound).all()
    assert (y.double() - exact).abs().max() > 0, "quantization must show: the test would not see a skipped step"


@pytest.mark.parametrize("config", [None, *CONFIGS])
@pytest.mark.parametrize("M, N, K", [(1, 200, 300), (5, 17, 128), (40, 129, 640)])
def test_triton_matches_float64(M, N, K, config, device):
    """Fresh inputs, a NaN-poisoned output: every element written, within the arithmetic bound."""
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    seed = M * 1000 + N + K + (CONFIGS.index(config) if config else 9)
    x = make_x(seed, (M, K), dtype, device)
    weight, scale = make_weight(seed, N, K, device=device)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=device)
    y = fp8_linear(x, weight, scale, backend="triton", config=config, out=out)
    assert y is out
    check_arithmetic(y.cpu(), x.cpu(), weight.cpu(), scale.cpu(), f"seed={seed} M={M} N={N} K={K} {config}")


@pytest.mark.parametrize("config", [None, CONFIGS[1], CONFIGS[2], CONFIGS[4]])
@pytest.mark.parametrize("M, G, R, K", [(1, 3, 128, 200), (17, 2, 256, 384)])
def test_grouped_equals_a_product_per_group(M, G, R, K, config, device):
    """One launch for G products (the grouped output projection): group g is x[:, g] · W[g·R:(g+1)·R]^T, each
    within the arithmetic bound; fused quantizer, split-K and the quantizer pass on [M·G, K] rows."""
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    seed = M * 7 + G * 3 + K
    x = make_x(seed, (M, G, K), dtype, device)
    weight, scale = make_weight(seed, G * R, K, device=device)
    y = fp8_linear_grouped(x, weight, scale, backend="triton", config=config)
    assert y.shape == (M, G * R) and y.dtype == dtype
    for g in range(G):
        rows = slice(g * R, (g + 1) * R)
        check_arithmetic(y[:, rows].cpu(), x[:, g].cpu(), weight[rows].cpu(), scale[g * R // BLOCK:(g + 1) * R // BLOCK]
                         .cpu(), f"group {g} of {G}, M={M} R={R} K={K} {config}")
    want = fp8_linear_grouped(x.cpu(), weight.cpu(), scale.cpu(), backend="reference")
    assert (y.cpu().double() - want.double()).abs().max() <= 2.0**-7 * want.double().abs().max()


def test_grouped_refuses_rows_that_split_a_tile():
    weight, scale = make_weight(0, 192, 256)
    with pytest.raises(ValueError, match="R a multiple of 128"):
        fp8_linear_grouped(torch.zeros(2, 3, 256), weight, scale)
    with pytest.raises(ValueError, match="x must be \\[M, G, K\\]"):
        fp8_linear_grouped(torch.zeros(2, 256), weight, scale)


def test_leading_dims_and_bf16_output(device):
    x = make_x(3, (2, 3, 200), torch.bfloat16, device)
    weight, scale = make_weight(3, 72, 200, device=device)
    y = fp8_linear(x, weight, scale, backend="triton", config=CONFIGS[0])
    assert y.shape == (2, 3, 72) and y.dtype == torch.bfloat16
    want = fp8_linear_ref(x.cpu(), weight.cpu(), scale.cpu())
    assert (y.cpu().double() - want.double()).abs().max() <= 2.0**-7 * want.double().abs().max()


def test_fnuz_weights(device):
    """MI300's flavour: `to_fnuz` is exact, and the GEMM quantizes x to fnuz (max 240) for those weights."""
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(2, 128)
    w = every_byte.view(torch.float8_e4m3fn)
    scale = torch.tensor([[2.0**-5]])
    w_nuz, scale_nuz = to_fnuz(w, scale)
    finite = ~w.float().isnan()
    assert torch.equal(dequant_fp8_block(w_nuz, scale_nuz)[finite], dequant_fp8_block(w, scale)[finite])
    weight, scale = make_weight(11, 40, 300)
    weight, scale = to_fnuz(weight, scale)
    for M, config in ((5, CONFIGS[1]), (40, CONFIGS[2])):  # fused quantizer + split-K; the quantizer pass
        x = make_x(11 + M, (M, 300), torch.float32)
        y = fp8_linear(x.to(device), weight.to(device), scale.to(device), backend="triton", config=config)
        check_arithmetic(y.cpu(), x, weight, scale, f"fnuz M={M} {config}")


@pytest.mark.parametrize("config", [CONFIGS[1], CONFIGS[2], CONFIGS[4]])
def test_fnuz_codes_widened_on_the_bits(config, monkeypatch, device):
    """fnuz weights where Triton has no fnuz type (NVIDIA): the quantizer writes uint8 codes and the GEMM widens
    both operands to fp16 on the bits (OPERANDS 2); forced here in the interpreter, the same function."""
    if device.type != "cpu":
        pytest.skip("forces the NVIDIA path through the interpreter")
    real = fp8_gemm._encode_mode
    monkeypatch.setattr(fp8_gemm, "_encode_mode",
                        lambda fp8, dev: 2 if fp8 == torch.float8_e4m3fnuz else real(fp8, dev))
    weight, scale = to_fnuz(*make_weight(13, 72, 384))
    assert fp8_gemm._operands(weight) == 2
    x = make_x(13, (17, 384), torch.float32)
    x[3, 5] = float("nan")
    y = fp8_linear(x, weight, scale, backend="triton", config=config)
    assert torch.isnan(y[3]).all(), "a NaN activation reaches its row through the scale"
    keep = [r for r in range(17) if r != 3]
    check_arithmetic(y[keep], x[keep], weight, scale, f"fnuz codes {config}")


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[2]])
def test_nan_input_reaches_only_its_row(config, device):
    x = make_x(5, (3, 256), torch.float32, device)
    x[1, 7] = float("nan")
    weight, scale = make_weight(5, 64, 256, device=device)
    y = fp8_linear(x, weight, scale, backend="triton", config=config)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()
    assert torch.isnan(fp8_linear_ref(x.cpu(), weight.cpu(), scale.cpu())[1]).all()


def test_config_table_covers_decode_and_prefill():
    assert default_fp8_config(1, 512, 4096, 132).split_k > 1, "a 512-wide decode GEMM needs split-K to fill 132 SMs"
    assert default_fp8_config(1, 32768, 1024, 132).split_k <= 2, "512 weight tiles nearly fill the GPU"
    prefill = default_fp8_config(8192, 4096, 4096, 132)  # the H200 sweep's best prefill tile (kernels/fp8_gemm.py)
    assert (prefill.block_m, prefill.block_n, prefill.num_warps, prefill.split_k) == (64, 128, 4, 1)
    assert default_fp8_config(4096, 512, 4096, 132).block_m == 64
    for M in (1, 16, 17, 64, 256, 4096):
        c = default_fp8_config(M, 4096, 4096, 132)
        assert c.quant_a == (M <= 16) and c.block_n <= BLOCK and (c.split_k == 1 or M <= 256)


@pytest.mark.parametrize("M", [1, 8, 32, 64, 256])
@pytest.mark.parametrize("N, K", [(1024, 4096), (512, 4096), (32768, 1024), (4096, 8192), (4096, 2048)])
def test_split_k_fills_the_gpu_within_the_partial_budget(M, N, K):
    """V4-Flash's decode projections on 132 SMs: split-K grows the grid toward 2 programs an SM and never past it,
    never past the budget (fp32 partials written ≤ a quarter of the weight bytes, ≥ 2 blocks of 128 a split), and
    never stops short while doubling would stay within all three (the rule bench_quant.py --sweep timed best on an
    H100: 0.92 of the best split per shape against 0.82 for 4-8 programs an SM and half the weights)."""
    c = default_fp8_config(M, N, K, 132)
    split, k_blocks = c.split_k, -(-K // BLOCK)
    tiles = -(-M // c.block_m) * -(-N // c.block_n)
    assert split >= 1 and split & (split - 1) == 0
    assert 4 * M * N * split <= N * K / 4 or split == 1, \
        f"M={M} N={N} K={K}: partials past a quarter of the weights: {c}"
    assert k_blocks // split >= 2 or split == 1, c
    assert tiles * split <= 2 * 132 or split == 1, f"M={M} N={N} K={K}: {tiles * split} programs past 2 an SM: {c}"
    could_double = (tiles * 2 * split <= 2 * 132 and k_blocks // (2 * split) >= 2
                    and 4 * M * N * 2 * split <= N * K / 4)
    assert not could_double, f"M={M} N={N} K={K}: {tiles * split} programs, split {split} could double: {c}"
    if (M, N, K) in ((64, 4096, 8192), (32, 4096, 8192)):  # the timed best split of wo_b at M = 32 and 64
        assert split == 4, c
        for arch in ("gfx942", "gfx950"):
            assert default_fp8_config(M, 4096, 4096, 304, arch).num_stages <= 3


@pytest.mark.parametrize("M, N, K, config", [(1, 200, 640, CONFIGS[1]), (40, 129, 640, CONFIGS[2])])
def test_tickets_buffer_is_left_zeroed(M, N, K, config, device):
    """Split-K with a caller's ticket buffer (no memset launch): each last program resets its tile's ticket, so two
    calls on fresh inputs and NaN-poisoned outputs both write every element within the bound, the buffer is zero
    after each, and the result is bit-identical to a call that makes its own zeroed counters."""
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    weight, scale = make_weight(M + N, N, K, device=device)
    tickets = torch.zeros(fp8_gemm.max_tickets(M, N) + 3, dtype=torch.int32, device=device)
    for seed in (M, M + 1):
        x = make_x(seed, (M, K), dtype, device)
        out = torch.full((M, N), float("nan"), dtype=dtype, device=device)
        y = fp8_linear(x, weight, scale, backend="triton", config=config, out=out, tickets=tickets)
        check_arithmetic(y.cpu(), x.cpu(), weight.cpu(), scale.cpu(), f"seed={seed} M={M} N={N} K={K} {config}")
        assert (tickets == 0).all(), f"tickets left {tickets.nonzero().flatten().tolist()} non-zero"
        assert torch.equal(y, fp8_linear(x, weight, scale, backend="triton", config=config))
    with pytest.raises(ValueError, match="tickets must be"):
        fp8_linear(x, weight, scale, backend="triton", config=config, tickets=tickets[:1])


def test_grouped_tickets_buffer(device):
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    M, G, R, K = 3, 2, 128, 384
    x = make_x(5, (M, G, K), dtype, device)
    weight, scale = make_weight(5, G * R, K, device=device)
    tickets = torch.zeros(fp8_gemm.max_tickets(M, R, G), dtype=torch.int32, device=device)
    config = Fp8GemmConfig(16, 64, split_k=3, quant_a=True, swap_ab=True)
    y = fp8_linear_grouped(x, weight, scale, backend="triton", config=config, tickets=tickets)
    assert (tickets == 0).all()
    assert torch.equal(y, fp8_linear_grouped(x, weight, scale, backend="triton", config=config))
    for g in range(G):
        rows = slice(g * R, (g + 1) * R)
        check_arithmetic(y[:, rows].cpu(), x[:, g].cpu(), weight[rows].cpu(),
                         scale[g * R // BLOCK:(g + 1) * R // BLOCK].cpu(), f"group {g} with tickets")


def test_empty_shapes(device):
    """M = 0 gives an empty result, K = 0 a zero one (no launch), on both paths."""
    weight, scale = make_weight(1, 40, 256, device=device)
    assert fp8_linear(torch.zeros(0, 256, device=device), weight, scale, backend="triton").shape == (0, 40)
    empty_k = torch.zeros(40, 0, device=device).to(torch.float8_e4m3fn)
    no_scales = torch.zeros(1, 0, device=device)
    for backend in ("triton", "reference"):
        y = fp8_linear(torch.ones(3, 0, device=device), empty_k, no_scales, backend=backend)
        assert y.shape == (3, 40) and (y == 0).all()


def test_bad_inputs_are_refused():
    weight, scale = make_weight(0, 64, 256)
    x = torch.zeros(3, 256)
    with pytest.raises(ValueError, match="weight_scale must be fp32 \\[1, 2\\]"):
        fp8_linear(x, weight, scale[:, :1])
    with pytest.raises(ValueError, match="last dim 255 must equal"):
        fp8_linear(x[:, :255], weight, scale)
    with pytest.raises(TypeError, match="weight must be FP8"):
        fp8_linear(x, weight.float(), scale)
    with pytest.raises(TypeError, match="x must be a bf16/fp16/fp32"):
        act_quant(x.double())
    with pytest.raises(ValueError, match="block_n must be"):
        fp8_linear(x, weight, scale, backend="triton", config=Fp8GemmConfig(16, 256))
    with pytest.raises(ValueError, match="block_m must be"):
        fp8_linear(x, weight, scale, backend="triton", config=Fp8GemmConfig(24, 64))
    with pytest.raises(ValueError, match="out must be"):
        fp8_linear(x, weight, scale, out=torch.empty(3, 63))


# --- GPU: V4-Flash's projections, bf16 activations ----------------------------------------------------
V4_FLASH_SHAPES = [(1024, 4096), (32768, 1024), (512, 4096), (4096, 8192), (1024, 4096 + 96)]  # (N, K); last: ragged


@needs_gpu
@pytest.mark.parametrize("M", [1, 8, 64, 256, 4096])
@pytest.mark.parametrize("N, K", V4_FLASH_SHAPES)
def test_gpu_v4_flash_shapes_bf16(M, N, K):
    seed = M + N + K
    x = make_x(seed, (M, K), torch.bfloat16, "cuda")
    weight, scale = make_weight(seed, N, K, device="cuda")
    out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device="cuda")
    y = fp8_linear(x, weight, scale, out=out)
    q, s = act_quant(x)
    q_ref, s_ref = act_quant_ref(x)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref), "act_quant bits"
    truth, mag = truth_and_magnitude(x, weight, scale)
    excess = (y.double() - truth).abs() - (OUT_ULP[torch.bfloat16] * truth.abs() + ACC_BOUND * mag)
    assert torch.isfinite(y).all() and excess.max() <= 0, (
        f"M={M} N={N} K={K} {default_fp8_config(M, N, K, torch.cuda.get_device_properties(0).multi_processor_count)}"
        f": worst excess {excess.max().item():.3g} at {divmod(excess.flatten().argmax().item(), N)}")


@needs_gpu
@pytest.mark.parametrize("M, N, K", [(1, 512, 4096), (8, 1024, 4096), (64, 1024, 4096), (256, 4096, 8192)])
def test_gpu_cuda_graph_replay_equals_eager(M, N, K):
    """Split-K's ordered reduction and the counters zeroed each call: replays are bit-identical to eager runs."""
    weight, scale = make_weight(M, N, K, device="cuda")
    inputs = [make_x(M + i, (M, K), torch.bfloat16, "cuda") for i in range(2)]
    eager = [fp8_linear(x, weight, scale) for x in inputs]
    static_x = inputs[0].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fp8_linear(static_x, weight, scale)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fp8_linear(static_x, weight, scale)
    for x, want in zip(inputs, eager, strict=True):
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, want), f"M={M} N={N} K={K}: replay differs from eager"
    # a persistent ticket buffer instead of the per-call memset, left zeroed by every replay; then the same with
    # programmatic dependent launch, three calls a graph (each launched while the one before drains)
    tickets = torch.zeros(fp8_gemm.max_tickets(M, N), dtype=torch.int32, device="cuda")
    pdl = dataclasses.replace(default_fp8_config(M, N, K, torch.cuda.get_device_properties(0).multi_processor_count),
                              pdl=True)
    for config, calls in ((None, 1), (pdl, 3)):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [fp8_linear(static_x, weight, scale, tickets=tickets, config=config) for _ in range(calls)]
        for x, want in zip(inputs * 2, eager * 2, strict=True):
            static_x.copy_(x)
            for out in outs:
                out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert all(torch.equal(out, want) for out in outs) and not tickets.any(), (
                f"M={M} N={N} K={K} {config}: tickets replay")


def test_pdl_config_is_the_same_function(device):
    """pdl=True runs without grid dependency control where there is none (the interpreter, AMD): same bits."""
    M, N, K = 5, 130, 640
    x = make_x(11, (M, K), torch.float32, device)
    weight, scale = make_weight(11, N, K, device=device)
    config = Fp8GemmConfig(16, 64, split_k=3, quant_a=True, swap_ab=True)
    want = fp8_linear(x, weight, scale, backend="triton", config=config)
    got = fp8_linear(x, weight, scale, backend="triton", config=dataclasses.replace(config, pdl=True))
    assert torch.equal(got, want)
