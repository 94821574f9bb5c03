"""FP8 block-scaled linear layers: y = x · W^T with W kept in FP8 e4m3 and x quantized on the fly.

Weights (as the checkpoint stores them; docs/dsv4-spec.md "Configurations", weights row): W [N, K] FP8 e4m3 with one
fp32 scale a 128×128 tile, s_w [ceil(N/128), ceil(K/128)] (ue8m0: powers of two; partial tiles at the edges).
Activations, per row m and block kb of 128 along K (as DeepSeek's reference inference does):

    amax[m, kb] = max(max_k |x[m, k]|, 1e-4)          (the floor keeps an all-zero block's scale finite and > 0)
    s_x[m, kb]  = 2^ceil(log2(amax / FP8_MAX))       (ue8m0: a power of two, so x / s_x is exact; NaN if amax is
                                                      not finite, so a NaN or inf in x reaches y)
    q_x[m, k]   = e4m3(x[m, k] / s_x[m, kb])         (round to nearest even; |x / s_x| ≤ FP8_MAX by construction)
    y[m, n]     = Σ_kb (Σ_{k in kb} q_x[m, k] · q_w[n, k]) · s_x[m, kb] · s_w[n // 128, kb]     (fp32, then x's dtype)

FP8_MAX = 448 for e4m3fn weights (H100/H200, MI355X); the GEMM also takes e4m3fnuz weights (MI300, gfx942: FP8
MFMA reads only that flavour; `to_fnuz` converts a checkpoint's tiles exactly), quantizing x to fnuz, max 240.
Where Triton has no fnuz type (NVIDIA) those weights are read as uint8 codes, x is quantized to codes on the bits,
and both are widened to fp16 exactly (`_widen_codes`; OPERANDS = 2): right, not fast.

Kernels:
1. `_act_quant_kernel`: [BLOCK_R, 128] a program → q (FP8 bytes) and s_x; the public `act_quant`, and the GEMM's
   first pass for M > 16.
2. `_fp8_gemm_kernel`: a [BLOCK_M, BLOCK_N] output tile a program (BLOCK_N ≤ 128, so one weight scale a K step),
   K in steps of 128: tl.dot on FP8 operands (Hopper / MI300 / MI355X FP8 tensor cores; widened to fp16 exactly
   where FP8 MMA is missing), a fresh product every 128-block, scaled by s_x · s_w and added into an fp32
   accumulator (DeepSeek's promotion: Hopper's FP8 MMA keeps ~13 fraction bits when it accumulates, so its
   accumulator never spans more than one block; an earlier version kept one accumulator over all of K, rescaled
   by powers of two, and missed the GPU test's accuracy bound at prefill). Scales of step kb + 1 load during kb.
   Activation quantization: fused into the K loop for the decode class M ≤ 16 (QUANT_A: each program
   re-quantizes its 16 rows, ≤ 0.5 quantized values a weight byte at BLOCK_N ≥ 32, hidden under the weight
   loads, and one launch less); above, `_act_quant_kernel` runs first (M·K reads, once).
   Decode tiles (M ≤ 16) compute (W · x^T)^T (SWAP_AB): 64 weight rows fill the M side of a Hopper FP8 wgmma,
   which reads both operands from shared memory (with 16 rows on the M side Triton takes mma.sync and widens W).
   Split-K for M ≤ 256 (decode and small batches) until the grid holds ~2 programs an SM (weight bytes in flight
   to cover DRAM latency), while the fp32 partials written stay within a quarter of the weight bytes: partial tiles
   in an fp32 workspace, the last program to finish a tile (an atomic ticket) sums them in split order (deterministic:
   bit-identical whatever the arrival order; the split count is a run-time argument, one compiled kernel for all)
   and resets the ticket to 0, so a caller's zeroed ticket buffer (`tickets=`) saves the memset launch a call
   otherwise makes.
Launch configs (`default_fp8_config`): per shape class of M (decode ≤ 16, ≤ 64, mid ≤ 512, prefill) a short list
of candidates, the first whose tiles fill the GPU once taken; per AMD target its stages; the grid depends on shapes
only (CUDA graphs). bench/bench_quant.py --sweep times the alternatives of each class.

References (plain PyTorch, also the CPU path): `act_quant_ref`, `dequant_fp8_block`, `fp8_linear_ref` (both
operands dequantized exactly to fp32, one fp32 matmul, cast to x's dtype).
Known limits: BLOCK = 128 only (the checkpoint's tile); x's last dim must be contiguous; the quantizer on GPUs
casts with the hardware's round-to-nearest-even (the interpreter, whose fp32→fp8 cast mis-rounds at binade edges,
encodes on the bits instead); at prefill a program holds the accumulator and the block's product (128 fp32
registers a thread at 128×128 / 8 warps: one program an SM), no warp specialisation or TMA (plain Triton).
Portability: plain Triton; tl.dot tiles ≥ 16×16; compile-checked for gfx950 and gfx942 (tests/kernels/
test_amd_compile.py).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sparsepd.kernels.device import Backend, amd_arch, pick_backend, triton_interpreting
from sparsepd.kernels.indexer import _encode_e4m3

try:  # grid dependency control (Triton ≥ 3.3): programmatic dependent launch, `Fp8GemmConfig.pdl`
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _HAS_GDC = True
except ImportError:  # an older Triton: pdl configs run without it (never traced: PDL stays False)
    _HAS_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass

BLOCK = 128  # the weight tile and the activation block along K
FP8_MAX = 448.0  # largest finite e4m3fn value (e4m3fnuz: 240)
AMAX_FLOOR = 1e-4  # DeepSeek's reference clamps amax so that an all-zero block gets a finite, nonzero scale
_FLOAT_INPUTS = (torch.bfloat16, torch.float16, torch.float32)
_FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


# --- references ---------------------------------------------------------------------------------
def _pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """Round positive fp32 x up to a power of two, exactly (x = m·2^e with m in [0.5, 1)); NaN where x is not
    finite."""
    mantissa, exponent = torch.frexp(x)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.where(torch.isfinite(x), torch.ldexp(torch.ones_like(x), exponent), torch.nan)


def _check_act(x: torch.Tensor, block: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in _FLOAT_INPUTS:
        raise TypeError(f"x must be a bf16/fp16/fp32 [..., K] tensor, got {getattr(x, 'dtype', type(x))} "
                        f"{list(getattr(x, 'shape', ()))}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")


def _quant_ref(x: torch.Tensor, block: int, fp8: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    top = float(torch.finfo(fp8).max)
    K = x.shape[-1]
    nb = -(-K // block)
    xf = torch.nn.functional.pad(x.float(), (0, nb * block - K)).unflatten(-1, (nb, block))  # [..., nb, block]
    amax = xf.abs().amax(-1).clamp_min(AMAX_FLOOR)  # [..., nb]; a NaN stays a NaN
    scale = _pow2_ceil(amax / top)
    q = (xf / scale[..., None]).clamp(-top, top).to(fp8)
    return q.flatten(-2)[..., :K], scale


def act_quant_ref(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 1×block FP8 quantization of x [..., K] (module docstring): (q [..., K] e4m3fn, s [..., ceil(K/block)]
    fp32); the last block may be partial."""
    _check_act(x, block)
    return _quant_ref(x, block, torch.float8_e4m3fn)


def dequant_fp8_block(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """W [N, K] FP8 times its 128×128 tile scales [ceil(N/128), ceil(K/128)] → fp32 [N, K] (exact)."""
    _check_weight(weight, weight_scale)
    N, K = weight.shape
    full = weight_scale.float().repeat_interleave(BLOCK, 0)[:N].repeat_interleave(BLOCK, 1)[:, :K]
    return weight.float() * full


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] → [..., N] in x's dtype: x quantized as `act_quant_ref` (in the weight's FP8 flavour), both
    operands dequantized exactly, one fp32 matmul."""
    _check_linear(x, weight, weight_scale)
    q, s = _quant_ref(x, BLOCK, weight.dtype)
    K = x.shape[-1]
    x_deq = q.float() * s.repeat_interleave(BLOCK, -1)[..., :K]
    return (x_deq @ dequant_fp8_block(weight, weight_scale).T).to(x.dtype)


def to_fnuz(weight: torch.Tensor, weight_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3fn tiles → e4m3fnuz for MI300's FP8 MFMA, exactly: the same bits mean half the value (exponent bias 8),
    so the scales double; −0 (0x80, NaN in fnuz) becomes +0. e4m3fn NaN (0x7F/0xFF) would read as ±240."""
    _check_weight(weight, weight_scale)
    if weight.dtype != torch.float8_e4m3fn:
        raise TypeError(f"weight must be e4m3fn, got {weight.dtype}")
    bits = weight.view(torch.uint8)
    bits = torch.where(bits == 0x80, torch.zeros_like(bits), bits)
    return bits.view(torch.float8_e4m3fnuz), weight_scale * 2


# --- checks -------------------------------------------------------------------------------------
def _check_weight(weight: torch.Tensor, weight_scale: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype not in _FP8:
        raise TypeError(f"weight must be FP8 e4m3 [N, K], got {getattr(weight, 'dtype', type(weight))} "
                        f"{list(getattr(weight, 'shape', ()))}")
    N, K = weight.shape
    want = (-(-N // BLOCK), -(-K // BLOCK))
    if tuple(weight_scale.shape) != want or weight_scale.dtype != torch.float32:
        raise ValueError(f"weight_scale must be fp32 {list(want)} (one per 128×128 tile of [{N}, {K}]), got "
                         f"{weight_scale.dtype} {list(weight_scale.shape)}")
    if weight_scale.device != weight.device:
        raise ValueError(f"weight_scale is on {weight_scale.device}, weight on {weight.device}")


def _check_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> None:
    _check_act(x, BLOCK)
    _check_weight(weight, weight_scale)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dim {x.shape[-1]} must equal weight's K = {weight.shape[1]}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device}, weight on {weight.device}")


# --- Triton kernels -----------------------------------------------------------------------------
@triton.jit
def _nan_max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _quantize_tile(x, FNUZ: tl.constexpr, ENCODE: tl.constexpr):
    """x [R, 128] fp32 → (q [R, 128], s [R] fp32) as `_quant_ref`: a NaN-propagating amax, the ue8m0 scale on the
    bits, an exact multiply by 1/s, e4m3 round to nearest even. ENCODE: 0 the hardware's cast to the FP8 type,
    1 the same codes from bit arithmetic (the interpreter, whose fp32 → fp8 cast mis-rounds at binade edges),
    2 those codes as uint8 (fnuz on NVIDIA, where Triton has no fnuz type: the GEMM widens the codes itself)."""
    fp8_max: tl.constexpr = 240.0 if FNUZ else 448.0
    amax = tl.maximum(tl.reduce(tl.abs(x), 1, _nan_max), 1e-4, propagate_nan=tl.PropagateNan.ALL)
    sb = tl.math.div_rn(amax, fp8_max).to(tl.int32, bitcast=True)
    sb = (sb & 0x7F800000) + tl.where((sb & 0x7FFFFF) != 0, 0x800000, 0)  # round up to a power of two
    finite = amax < float("inf")  # False for inf and NaN
    scale = tl.where(finite, sb.to(tl.float32, bitcast=True), float("nan"))
    inv = tl.where(finite, ((254 << 23) - sb).to(tl.float32, bitcast=True), float("nan"))  # exact 1 / scale
    y = tl.minimum(tl.maximum(x * inv[:, None], -fp8_max, propagate_nan=tl.PropagateNan.ALL), fp8_max,
                   propagate_nan=tl.PropagateNan.ALL)
    if ENCODE == 0:
        q = y.to(tl.float8e4b8) if FNUZ else y.to(tl.float8e4nv)
    else:
        code = _encode_e4m3(y, 8 if FNUZ else 7, FNUZ)
        code = tl.where(y == y, code, 0x80 if FNUZ else 0x7F).to(tl.uint8)
        if ENCODE == 2:
            q = code
        else:
            q = code.to(tl.float8e4b8, bitcast=True) if FNUZ else code.to(tl.float8e4nv, bitcast=True)
    return q, scale


@triton.jit
def _widen_codes(c):
    """e4m3 codes (uint8) → fp16 holding value · 2^−7 (fnuz) or 2^−8 (fn), exactly: the code's exponent and
    mantissa bits placed at fp16's (e = 0 lands on fp16's subnormals); the caller folds the power of two into its
    scale. The NaN codes are not kept (a NaN activation's row is NaN through its scale)."""
    c = c.to(tl.int16)
    return (((c & 0x7F) << 7) | ((c & 0x80) << 8)).to(tl.float16, bitcast=True)


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm,
                      BLOCK_R: tl.constexpr, FNUZ: tl.constexpr, ENCODE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    kb = tl.program_id(1)
    cols = kb * 128 + tl.arange(0, 128)
    rows64 = rows.to(tl.int64)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    q, s = _quantize_tile(x, FNUZ, ENCODE)
    if ENCODE != 2:
        q = q.to(tl.uint8, bitcast=True)
    tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], q, mask=mask)
    tl.store(s_ptr + rows64 * stride_sm + kb, s, mask=rows < M)


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, c_ptr, ws_ptr, counter_ptr,
    M, N, K, stride_am, stride_as, stride_wn, stride_ws, stride_cm, blocks_per_split, num_splits,
    stride_ag, stride_asg, stride_wg, stride_wsg, stride_cg, stride_wsm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, SPLIT: tl.constexpr,
    QUANT_A: tl.constexpr, SWAP_AB: tl.constexpr, FNUZ: tl.constexpr, OPERANDS: tl.constexpr,
    ENCODE: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # programmatic dependent launch (NVIDIA sm_90+): the next launch may start while this one drains
        gdc_launch_dependents()
    # grouped order: GROUP_M row tiles share each weight column tile while it sits in L2
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # axis 2: independent products of a grouped projection (`fp8_linear_grouped`): group g reads its own x columns,
    # weight rows and scale rows, writes its own output columns (all offsets 0 for one product)
    g = tl.program_id(2).to(tl.int64)
    a_ptr += g * stride_ag
    a_scale_ptr += g * stride_asg
    w_ptr += g * stride_wg
    w_scale_ptr += g * stride_wsg
    c_ptr += g * stride_cg
    ws_ptr += g * stride_cg
    counter_ptr += g * tiles_m * tiles_n
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_size
    pid_n = (pid % (GROUP_M * tiles_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, 128)
    m_ok = offs_m < M
    n_ok = offs_n < N
    kb_begin = split * blocks_per_split
    kb_end = tl.minimum(kb_begin + blocks_per_split, tl.cdiv(K, 128))
    rows = offs_m.to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + (kb_begin * 128 + offs_k)[None, :]  # [BM, 128]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + (kb_begin * 128 + offs_k)[None, :]  # [BN, 128]
    ws_row = w_scale_ptr + (pid_n * BLOCK_N // 128) * stride_ws  # BLOCK_N ≤ 128: one weight scale a step
    # widened codes (OPERANDS 2) hold value · 2^−7 (fnuz) / 2^−8 (fn) each: the product's power of two
    unit: tl.constexpr = (16384.0 if FNUZ else 65536.0) if OPERANDS == 2 else 1.0
    # SWAP_AB: acc^T = W · x^T, the weight tile on the MMA's M side (64 weight rows fill a Hopper wgmma at M ≤ 16
    # tokens, which then reads both FP8 operands from shared memory instead of widening W for mma.sync)
    acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP_AB else (BLOCK_M, BLOCK_N), dtype=tl.float32)
    # the scales of step kb + 1 are loaded during step kb: the pipeliner overlaps only the tiles' loads, and a
    # scale load waited on in its own step costs a DRAM latency every step
    sw_next = tl.load(ws_row + kb_begin)
    if PDL:  # launched before the previous kernel finished: the weights are constant, x and the buffers are not
        gdc_wait()
    sa_next = tl.load(a_scale_ptr + rows * stride_as + kb_begin, mask=m_ok, other=1.0)  # every split has a block
    for kb in range(kb_begin, kb_end):
        sw = sw_next
        kb_next = tl.minimum(kb + 1, kb_end - 1)
        sw_next = tl.load(ws_row + kb_next)
        k_ok = offs_k < K - kb * 128
        if QUANT_A:
            x = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            a, sa = _quantize_tile(x, FNUZ, ENCODE)
            sa = tl.where(m_ok, sa, 1.0)
        else:
            sa = sa_next
            sa_next = tl.load(a_scale_ptr + rows * stride_as + kb_next, mask=m_ok, other=1.0)
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # FP8 pointers: no bitcast between
        # the pipelined shared-memory tile and the MMA (a uint8 load + bitcast cost a shared-memory copy a step)
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # W's rows [BN, 128], K-major
        if OPERANDS == 1:  # no FP8 MMA: FP8 → fp16 is exact
            a = a.to(tl.float16)
            w = w.to(tl.float16)
        elif OPERANDS == 2:  # uint8 codes (fnuz on NVIDIA): widened on the bits
            a = _widen_codes(a)
            w = _widen_codes(w)
        f = sa * (sw * unit)  # [BM]: this step's scale of each output row, a power of two
        # a fresh product every 128-block, scaled and added in fp32 (DeepSeek's promotion): Hopper's FP8 MMA keeps
        # ~13 fraction bits when it adds into its accumulator, so the accumulator must not span more than one block
        if SWAP_AB:
            acc += tl.dot(w, tl.trans(a)) * f[None, :]
        else:
            acc += tl.dot(a, tl.trans(w)) * f[:, None]
        a_ptrs += 128
        w_ptrs += 128
    if SWAP_AB:
        acc = tl.trans(acc)

    mask = m_ok[:, None] & n_ok[None, :]
    c_ptrs = c_ptr + rows[:, None] * stride_cm + offs_n[None, :]
    if not SPLIT:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)
    else:
        # partials of this tile in an fp32 workspace [num_splits, M, N] (a run-time count: one compiled kernel
        # for every split); the last program to arrive sums them in
        # split order (deterministic whatever the arrival order) and writes the tile
        tile_ws = ws_ptr + rows[:, None] * stride_wsm + offs_n[None, :]
        tl.store(tile_ws + split.to(tl.int64) * M * stride_wsm, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the release below
        ticket = counter_ptr + pid_m * tiles_n + pid_n
        arrived = tl.atomic_add(ticket, 1, sem="acq_rel")
        if arrived == num_splits - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(num_splits):
                total += tl.load(tile_ws + s * M * stride_wsm, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(c_ptrs, total.to(c_ptr.dtype.element_ty), mask=mask)
            # every split has arrived: the ticket goes back to 0, so a zeroed ticket buffer stays zeroed across
            # launches and a caller's buffer (`tickets=`) replaces the memset launch a call would need
            tl.atomic_xchg(ticket, 0)


# --- launch configuration -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Fp8GemmConfig:
    """One launch of `_fp8_gemm_kernel` (None: `default_fp8_config`)."""

    block_m: int  # power of two ≥ 16
    block_n: int  # power of two in [16, 128]: a tile spans one weight scale row
    split_k: int = 1  # programs along K (partials summed in order by the last one)
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    quant_a: bool = False  # quantize x inside the K loop instead of a first pass
    swap_ab: bool = False  # compute (W · x^T)^T: the weight tile on the MMA's M side (decode)
    max_regs: int = 0  # NVIDIA: cap registers a thread (Triton's maxnreg; 0 none), e.g. 128 for two 8-warp programs
    # NVIDIA sm_90+: programmatic dependent launch: the GEMM is launched while the kernel before it drains, runs its
    # setup and its first weight-scale load, and waits (griddepcontrol.wait) before reading x or writing anything.
    # Hides a launch's latency at decode, where it is most of the time (bench/RESULTS.md, 2026-12-06). Off on AMD
    # and in the interpreter. A memset between two launches (no ticket buffer) breaks the overlap.
    pdl: bool = False


# Shape classes, (largest M, candidates in order of preference). Decode (M ≤ 64) is weight-bound: the programs
# must keep enough weight bytes in flight to cover DRAM latency, so a small tile on the token side, 64 weight rows,
# deep pipelines, and split-K (`choose_split_k`, up to M = 256) until the grid holds ~2 programs an SM. Prefill is
# MMA-bound:
# 64×128 tiles with 4 warps, 3 stages. `bench/bench_quant.py --sweep` on an H200 (2026-12-06) put them first or
# second on all seven V4-Flash projections at M = 8192, 1.02–1.22× the 128×128 8-warp tiles that were the
# default (those keep acc + the fresh 128-block product in 128 fp32 registers a thread, two programs an SM at most).
# The first candidate whose tiles fill the GPU once is taken (the last one otherwise).
_DECODE_TARGET_PROGRAMS = 2  # programs an SM that split-K fills up to at decode (never past)
# Split-K applies up to M = _SPLIT_MAX_M rows while the fp32 partials a launch writes (4·M·N bytes a split, read back
# once by the last program of each tile, from L2 while they fit there) stay within _PARTIAL_SHARE of the weight
# bytes. Timed on an H100 (bench_quant.py --sweep, 2026-12-06, every split of each V4-Flash decode shape at
# M = 1-256): the rule of that morning (up to 4 programs an SM, overshooting to 8; partials ≤ half the weights)
# reached 0.82 of the best config per shape (geometric mean; 0.28 vs 0.48 of the floor for wo_b at M = 64), this one
# (≤ 2 an SM, ≤ a quarter) 0.92. Before both, M ≤ 64 only (PREVIOUS_SPLIT_RULE) had left the 4096-deep projections
# 16-32 programs at M = 64.
_SPLIT_MAX_M = 256
_PARTIAL_SHARE = 0.25
PREVIOUS_SPLIT_RULE = dict(max_m=64, partial_share=0.125)  # the rule before 2026-12-06, for bench_quant.py's sweep
_CONFIG_TABLE: tuple[tuple[int | None, tuple[Fp8GemmConfig, ...]], ...] = (
    (16, (Fp8GemmConfig(16, 64, num_warps=4, num_stages=4, group_m=1, quant_a=True, swap_ab=True),)),
    (64, (Fp8GemmConfig(64, 64, num_warps=4, num_stages=4, group_m=1),)),
    (512, (Fp8GemmConfig(64, 128, num_warps=4, num_stages=4, group_m=8),)),
    (None, (Fp8GemmConfig(64, 128, num_warps=4, num_stages=3, group_m=8),)),
)
# AMD: the same tiles, fewer stages where the pipelined tiles overflow the LDS (64 KiB on gfx942, 160 KiB on
# gfx950): stages of each class above (compile-checked by tests/kernels/test_amd_compile.py, not timed).
_AMD_STAGES = {"gfx942": (2, 2, 2, 2), "gfx950": (3, 3, 2, 2)}
_MIN_SPLIT_BLOCKS = 2  # K blocks (of 128) a split keeps at least


def config_class(M: int) -> int:
    """The row of `_CONFIG_TABLE` for M rows."""
    return next(i for i, (limit, _) in enumerate(_CONFIG_TABLE) if limit is None or M <= limit)


def default_fp8_config(M: int, N: int, K: int, num_sms: int, arch: str | None = None) -> Fp8GemmConfig:
    """The table's config for M (the first candidate whose tiles fill the GPU once), its AMD stages, and split-K
    where the tiles alone leave the GPU short of programs."""
    row = config_class(M)
    candidates = _CONFIG_TABLE[row][1]
    c = next((c for c in candidates if triton.cdiv(M, c.block_m) * triton.cdiv(N, c.block_n) >= num_sms),
             candidates[-1])
    stages = _AMD_STAGES[arch][row] if arch in _AMD_STAGES else c.num_stages
    return dataclasses.replace(c, split_k=choose_split_k(M, N, K, c.block_m, c.block_n, num_sms), num_stages=stages)


def choose_split_k(M: int, N: int, K: int, block_m: int, block_n: int, num_sms: int, *,
                   max_m: int = _SPLIT_MAX_M, partial_share: float = _PARTIAL_SHARE) -> int:
    """Powers of two while the doubled grid holds at most _DECODE_TARGET_PROGRAMS programs an SM (M ≤ max_m only), each
    split keeping ≥ _MIN_SPLIT_BLOCKS blocks of K, and the fp32 partials written (4·M·N bytes a split) at most
    `partial_share` of the weight bytes (N·K)."""
    if M > max_m:
        return 1
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    k_blocks = triton.cdiv(K, BLOCK)
    split = 1
    while (tiles * 2 * split <= _DECODE_TARGET_PROGRAMS * num_sms and k_blocks // (2 * split) >= _MIN_SPLIT_BLOCKS
           and 4 * M * N * (2 * split) <= partial_share * N * K):
        split *= 2
    return split


def max_tickets(M: int, N: int, groups: int = 1) -> int:
    """Ticket counters any split-K launch of [M, K] × [N, K]^T (G groups of N) needs at most: one an output tile,
    tiles at least 16×16. A caller's zeroed int32 buffer of this size (`tickets=`) stays zeroed after every launch."""
    return groups * triton.cdiv(M, 16) * triton.cdiv(N, 16)


def _check_config(config: Fp8GemmConfig) -> None:
    if config.block_m < 16 or config.block_m & (config.block_m - 1):
        raise ValueError(f"config.block_m must be a power of two >= 16, got {config.block_m}")
    if not 16 <= config.block_n <= BLOCK or config.block_n & (config.block_n - 1):
        raise ValueError(f"config.block_n must be a power of two in [16, {BLOCK}], got {config.block_n}")
    if config.max_regs and not 24 <= config.max_regs <= 255:
        raise ValueError(f"config.max_regs must be 0 or in [24, 255], got {config.max_regs}")
    if config.split_k < 1 or config.group_m < 1:
        raise ValueError(f"config.split_k and group_m must be >= 1, got {config.split_k}, {config.group_m}")


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _fp8_dot_supported(device: torch.device) -> bool:
    """FP8 MMA: NVIDIA sm_89+, AMD gfx942 (fnuz only: e4m3fn weights there are widened unless `to_fnuz` converted
    them) and gfx950 (OCP); the interpreter's dot takes FP8 too. Elsewhere the FP8 tiles are widened to fp16,
    exactly."""
    if device.type != "cuda":
        return True
    if torch.version.hip:
        return torch.cuda.get_device_properties(device).gcnArchName.startswith(("gfx942", "gfx950"))
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch (griddepcontrol): NVIDIA sm_90+, compiled (not the interpreter)."""
    if device.type != "cuda" or torch.version.hip or triton_interpreting() or not _HAS_GDC:
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


# --- public API ---------------------------------------------------------------------------------
def _encode_mode(fp8: torch.dtype, device: torch.device) -> int:
    """`_quantize_tile`'s ENCODE for this FP8 flavour here: bits in the interpreter, uint8 codes for fnuz outside
    ROCm (Triton has no fnuz type on NVIDIA), else the hardware cast."""
    if fp8 == torch.float8_e4m3fnuz and not torch.version.hip and not triton_interpreting():
        return 2
    return 1 if triton_interpreting() else 0


def _launch_act_quant(x2: torch.Tensor, fp8: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [M, K] uint8 codes, s [M, ceil(K/128)] fp32); the caller views q as its FP8 type where it has one."""
    M, K = x2.shape
    q = torch.empty((M, K), dtype=torch.uint8, device=x2.device)
    s = torch.empty((M, triton.cdiv(K, BLOCK)), dtype=torch.float32, device=x2.device)
    if M:
        block_r = 16 if M >= 16 * _num_sms(x2.device) else 4
        _act_quant_kernel[(triton.cdiv(M, block_r), triton.cdiv(K, BLOCK))](
            x2, q, s, M, K, x2.stride(0), q.stride(0), s.stride(0),
            BLOCK_R=block_r, FNUZ=fp8 == torch.float8_e4m3fnuz, ENCODE=_encode_mode(fp8, x2.device), num_warps=4,
        )
    return q, s


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(x.shape[:-1].numel(), x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def act_quant(x: torch.Tensor, block: int = BLOCK, *, backend: Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """`act_quant_ref`'s result (bit for bit), from a Triton kernel on GPU tensors; block 128 only there."""
    _check_act(x, block)
    if pick_backend(backend, x) == "reference":
        return act_quant_ref(x, block)
    if block != BLOCK:
        raise ValueError(f"the Triton act_quant takes block {BLOCK}, got {block}")
    q, s = _launch_act_quant(_rows(x), torch.float8_e4m3fn)
    return q.view(torch.float8_e4m3fn).view(x.shape), s.view(*x.shape[:-1], s.shape[-1])


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, *,
               backend: Backend = "auto", config: Fp8GemmConfig | None = None,
               out: torch.Tensor | None = None, tickets: torch.Tensor | None = None) -> torch.Tensor:
    """y = x · W^T [..., N] in x's dtype, with W [N, K] FP8 (e4m3fn, or e4m3fnuz for MI300) and its 128×128 tile
    scales (module docstring); no host sync. `out` (contiguous [..., N] in x's dtype), if given, receives y.
    `tickets` (zeroed int32, ≥ `max_tickets(M, N)` elements, left zeroed): split-K's counters, instead of a zeroed
    buffer made (one memset launch) each call."""
    _check_linear(x, weight, weight_scale)
    if config is not None:
        _check_config(config)
    shape = (*x.shape[:-1], weight.shape[0])
    if out is not None and (tuple(out.shape) != shape or out.dtype != x.dtype or not out.is_contiguous()
                            or out.device != x.device):
        raise ValueError(f"out must be a contiguous {x.dtype} {list(shape)} tensor on {x.device}, got {out.dtype} "
                         f"{list(out.shape)} on {out.device}")
    if pick_backend(backend, x, weight, weight_scale) == "reference":
        y = fp8_linear_ref(x, weight, weight_scale)
        return y if out is None else out.copy_(y)
    if weight.stride(1) != 1 or weight_scale.stride(1) != 1:
        raise ValueError(f"weight and weight_scale need a unit last stride, got {weight.stride()}, "
                         f"{weight_scale.stride()}")
    x2 = _rows(x)
    M, K = x2.shape
    N = weight.shape[0]
    out = torch.empty(shape, dtype=x.dtype, device=x.device) if out is None else out
    if M == 0 or N == 0 or K == 0:
        return out.zero_()
    if config is None:
        config = default_fp8_config(M, N, K, _num_sms(x.device), amd_arch(x.device))
    _launch_gemm(x2, weight, weight_scale, out.view(M, N), config, tickets=tickets)
    return out


def fp8_linear_grouped(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, *,
                       backend: Backend = "auto", config: Fp8GemmConfig | None = None,
                       tickets: torch.Tensor | None = None) -> torch.Tensor:
    """G independent products in one launch: x [M, G, K] (group g's inputs x[:, g]) with rows g·R … (g+1)·R − 1
    of W [G·R, K] (FP8, 128×128 tile scales; R a multiple of 128, so each group owns whole scale rows) → y [M, G·R]
    in x's dtype, group g in columns g·R …; each group as `fp8_linear` computes it (the grouped output projection
    of docs/dsv4-spec.md "Attention layer", step 7, in one launch instead of G). `tickets` as `fp8_linear`'s,
    ≥ `max_tickets(M, R, G)` elements."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be [M, G, K], got {list(getattr(x, 'shape', ()))}")
    M, G, K = x.shape
    _check_weight(weight, weight_scale)
    if G < 1 or weight.shape[0] % G or (weight.shape[0] // G) % BLOCK or weight.shape[1] != K:
        raise ValueError(f"weight must be [G·R, K] = [{G}·R, {K}] with R a multiple of {BLOCK}, got "
                         f"{list(weight.shape)}")
    _check_linear(x[:, 0], weight, weight_scale)
    if config is not None:
        _check_config(config)
    R = weight.shape[0] // G
    if pick_backend(backend, x, weight, weight_scale) == "reference":
        return torch.cat([fp8_linear_ref(x[:, g], weight[g * R:(g + 1) * R], weight_scale[g * R // BLOCK:
                                                                                          (g + 1) * R // BLOCK])
                          for g in range(G)], dim=-1)
    if weight.stride(1) != 1 or weight_scale.stride(1) != 1:
        raise ValueError(f"weight and weight_scale need a unit last stride, got {weight.stride()}, "
                         f"{weight_scale.stride()}")
    x2 = x.reshape(M, G * K).contiguous()  # the quantizer reads it as [M·G, K] rows
    out = torch.empty((M, G * R), dtype=x.dtype, device=x.device)
    if M == 0 or K == 0:
        return out.zero_()
    if config is None:
        config = default_fp8_config(M, G * R, K, _num_sms(x.device), amd_arch(x.device))
    _launch_gemm(x2, weight, weight_scale, out, config, groups=G, tickets=tickets)
    return out


def _operands(weight: torch.Tensor) -> int:
    """The kernel's OPERANDS: 0 FP8 into the MMA, 1 FP8 widened to fp16 (no FP8 MMA here, or e4m3fn weights on
    gfx942, whose FP8 MFMA reads only fnuz), 2 uint8 codes widened on the bits (fnuz weights outside ROCm)."""
    fnuz = weight.dtype == torch.float8_e4m3fnuz
    if _encode_mode(weight.dtype, weight.device) == 2:
        return 2
    if not _fp8_dot_supported(weight.device) or (not fnuz and amd_arch(weight.device) == "gfx942"):
        return 1
    return 0


def _launch_gemm(x2: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, out: torch.Tensor,
                 config: Fp8GemmConfig, groups: int = 1, tickets: torch.Tensor | None = None) -> None:
    """out = x2 · W^T, or with groups > 1 the grouped product: x2 [M, G·K] (group g's inputs in columns g·K …),
    weight [G·R, K] (group g's rows g·R …, R a multiple of 128), out [M, G·R] (group g's columns g·R …)."""
    M, K = x2.shape[0], x2.shape[1] // groups
    N = weight.shape[0] // groups  # a group's output columns
    fnuz = weight.dtype == torch.float8_e4m3fnuz
    operands = _operands(weight)
    if operands == 2:
        weight = weight.view(torch.uint8)
    if config.quant_a:
        a, a_scale = x2, x2  # a_scale unused
        stride_am, stride_as, stride_ag, stride_asg = x2.stride(0), 0, K, 0
    else:  # quantized as [M·G, K] rows: group g's row m is row m·G + g
        a, a_scale = _launch_act_quant(x2.view(M * groups, K) if groups > 1 else x2,
                                       weight.dtype if operands != 2 else torch.float8_e4m3fnuz)
        if operands != 2:
            a = a.view(weight.dtype)
        stride_am, stride_as = groups * a.stride(0), groups * a_scale.stride(0)
        stride_ag, stride_asg = a.stride(0), a_scale.stride(0)
    pdl = config.pdl and _pdl_supported(x2.device)
    k_blocks = triton.cdiv(K, BLOCK)
    split = min(config.split_k, k_blocks)
    blocks_per_split = triton.cdiv(k_blocks, split)
    split = triton.cdiv(k_blocks, blocks_per_split)  # no empty splits
    tiles = triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n)
    if split > 1:
        ws = torch.empty((split, M, groups * N), dtype=torch.float32, device=x2.device)
        if tickets is None:
            counters = torch.zeros((groups * tiles,), dtype=torch.int32, device=x2.device)
        elif (tickets.dtype != torch.int32 or tickets.device != x2.device or tickets.numel() < groups * tiles
              or not tickets.is_contiguous()):
            raise ValueError(f"tickets must be a contiguous int32 tensor of ≥ {groups * tiles} elements on "
                             f"{x2.device}, got {tickets.dtype} {list(tickets.shape)} on {tickets.device}")
        else:
            counters = tickets
    else:
        ws = counters = out  # unused
    _fp8_gemm_kernel[(tiles, split, groups)](
        a, a_scale, weight, weight_scale, out, ws, counters,
        M, N, K, stride_am, stride_as, weight.stride(0), weight_scale.stride(0), out.stride(0),
        blocks_per_split, split,
        stride_ag, stride_asg, N * weight.stride(0), N // BLOCK * weight_scale.stride(0), N, groups * N,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, GROUP_M=config.group_m, SPLIT=split > 1,
        QUANT_A=config.quant_a, SWAP_AB=config.swap_ab, FNUZ=fnuz, OPERANDS=operands,
        ENCODE=_encode_mode(torch.float8_e4m3fnuz if fnuz else torch.float8_e4m3fn, x2.device), PDL=pdl,
        num_warps=config.num_warps, num_stages=config.num_stages,
        **({"maxnreg": config.max_regs} if config.max_regs and not torch.version.hip else {}),
        **({"launch_pdl": True} if pdl else {}),
    )
