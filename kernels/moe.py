"""Routed experts as two grouped GEMMs over expert-sorted rows (docs/dsv4-spec.md "Block, MoE and head").

For token t with routing weights w[t, j] and expert ids e = e[t, j] (j < k, from the `Gate`), L = swiglu_limit:

    g[t, j] = min(x_t · W1_e^T, L)          u[t, j] = clamp(x_t · W3_e^T, −L, L)      (no clamps when L ≤ 0)
    h[t, j] = w[t, j] · silu(g[t, j]) · u[t, j]                   computed in fp32, stored in x's dtype
    y[t]    = Σ_j h[t, j] · W2_e^T                                fp32 [T, dim] (the shared expert is not in it)

Dispatch (`build_dispatch`, no host sync): the T·k (token, slot) pairs are sorted by expert (stable: token order
within an expert) and each expert's group is padded to a multiple of BLOCK_M, into a sorted-row array of fixed
capacity T·k + min(E, T·k)·(BLOCK_M − 1) rounded up to BLOCK_M (pair id t·k + j, −1 on padding) and one expert
id per block of BLOCK_M rows (−1 past the last real block: those programs exit at once). Every shape depends on
(T, k, E, BLOCK_M) only, so a CUDA graph can capture the whole forward. One Triton launch for ≤ 512 pairs
(histogram, tl.sort of (expert, pair) keys, scatter), plus a per-chunk counting launch beyond: 2–8 µs on H200
where the same from torch ops (`build_dispatch_ref`: sort, searchsorted, cumsum, scatter) took 42–77 µs.

Kernels, one launch each, grid (block of rows, output tile), row blocks fastest so the programs that share an
expert's weight tile run side by side and re-read it from L2:
1. `_gate_up_kernel`: gathers the block's x rows, x·W1_e^T and x·W3_e^T from the fused `w13 [E, 2·inter, dim]`
   (W1 rows, then W3 rows), clamp, SwiGLU, times the routing weight; h `[capacity, inter]` in x's dtype.
2. `_down_kernel`: h·W2_e^T with `w2 [E, dim, inter]`, stored in fp32 at the pair's row of `[T·k, dim]`;
   then `.sum(1)` over the `[T, k, dim]` view (deterministic: no atomics).
Each program reads its expert's weight tile once per block of rows, so a decode step with ≤ BLOCK_M rows per
expert reads every touched expert's weights once.

Supported: x and weights of one dtype, bf16 / fp16 / fp32 (fp32 products in IEEE fp32, not TF32); any T, k, E,
dim, inter. The reference (`moe_ref`) also takes fp64 (the tests' ground truth).
Known limits: expert ids must lie in [0, E) (not checked: that would need a host sync; an id outside is dropped by
the Triton dispatch, its output row left unwritten); the fp32 `[T·k, dim]` buffer costs 4·T·k·dim bytes while it
lives (805 MB at T=8192, k=6, dim=4096); with more rows per expert than BLOCK_M an expert's weights are read once
per block (from L2 when the blocks run together); x rows are gathered with plain loads (no TMA), so prefill runs
at ~45% of the bf16 matmul rate (see the table below).
Portability: plain Triton, tl.dot tiles ≥ 16×16.

FP4 experts (`moe_fp4`, the checkpoint's routed experts; docs/dsv4-spec.md "Configurations", weights row): the same
dispatch, kernels and epilogues (W_FMT selects the weight tile), with w13 / w2 kept as the checkpoint stores them:
packed e2m1 `[E, rows, K/2]` uint8 (low nibble = element 2i) and one ue8m0 byte `[E, rows, K/32]` per 32 inputs of
a row, 2^(byte − 127). That is the OCP MX FP4 layout (K-packed values, scales per 32 along K) that tl.dot_scaled
and an MFMA FP4 path (MI355X's scaled MFMA) read as is. Each tile is dequantized in registers to x's dtype
(exact: a 2-bit significand times a power of two) and fed to tl.dot: H200 has no FP4 tensor cores. Three ways to
unpack (MoEConfig.fp4_unpack): tl.dot_scaled (default for 16-bit x), the kernels' own bit ops (`_fp4_tile`,
portable, fp32 x), and a PTX sequence for bf16 on NVIDIA (`_fp4_tile_ptx`). Decode reads each touched expert's
packed bytes once: a quarter of bf16's bytes, but unpacking costs ALU work a weight (compiled for sm_90: ~8-10
instructions a value in the decode loop), which bounds how close decode gets to its byte floor.
Known limits (FP4): dim and inter multiples of 32; in `_fp4_tile` scale bytes above 240 (2^113) overflow.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sparsepd.kernels.device import Backend, amd_arch, pick_backend

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# --- dispatch -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MoEDispatch:
    """Expert-sorted rows for the grouped GEMMs (module docstring); shapes depend on (T, k, E, block_m) only."""

    sorted_pairs: torch.Tensor  # [capacity] int32: pair id t·k + j of each sorted row, −1 on padding
    block_expert: torch.Tensor  # [capacity / block_m] int32: the expert of each block of rows, −1 past the last
    block_m: int


def dispatch_capacity(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows of the sorted array: every pair, plus < block_m padding for each of at most min(E, pairs) groups."""
    rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return triton.cdiv(rows, block_m) * block_m


_MAX_CHUNK = 512  # pairs a dispatch program sorts (more take a counting launch first): 2048 took 24 µs on H200


@triton.jit
def _chunk_experts(indices_ptr, chunk, num_pairs, top_k, stride_t, stride_k, num_experts, CHUNK: tl.constexpr):
    """The expert ids of one chunk of pairs, int32; padding and ids outside [0, E) become E (a spare bin)."""
    pair = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = pair < num_pairs
    t = pair // top_k
    e = tl.load(indices_ptr + t.to(tl.int64) * stride_t + (pair - t * top_k) * stride_k, mask=valid,
                other=num_experts).to(tl.int32)
    return tl.where(valid & (e >= 0) & (e < num_experts), e, num_experts)


@triton.jit
def _dispatch_count_kernel(indices_ptr, counts_ptr, num_pairs, top_k, stride_t, stride_k, num_experts,
                           CHUNK: tl.constexpr, E_BINS: tl.constexpr):
    chunk = tl.program_id(0)
    e = _chunk_experts(indices_ptr, chunk, num_pairs, top_k, stride_t, stride_k, num_experts, CHUNK)
    tl.store(counts_ptr + chunk * E_BINS + tl.arange(0, E_BINS), tl.histogram(e, E_BINS))


@triton.jit
def _dispatch_place_kernel(
    indices_ptr, counts_ptr, pairs_ptr, block_expert_ptr,
    num_pairs, top_k, stride_t, stride_k, num_experts, num_chunks, capacity,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, E_BINS: tl.constexpr, LOG_BINS: tl.constexpr,
    TILE: tl.constexpr, COUNTED: tl.constexpr,
):
    chunk = tl.program_id(0)
    num_programs = tl.num_programs(0)
    e = _chunk_experts(indices_ptr, chunk, num_pairs, top_k, stride_t, stride_k, num_experts, CHUNK)
    bins = tl.arange(0, E_BINS)
    real = bins < num_experts
    hist = tl.histogram(e, E_BINS)  # [E_BINS]: this chunk's pairs of each expert
    total = hist
    before = hist * 0  # pairs of each expert in earlier chunks
    if COUNTED:
        total = before
        for r in range(0, num_chunks):
            row = tl.load(counts_ptr + r * E_BINS + bins)
            total += row
            before += tl.where(r < chunk, row, 0)
    total = tl.where(real, total, 0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    group_end = tl.cumsum(padded, 0)
    group_start = group_end - padded

    # This chunk's pairs in (expert, pair) order: sorted position s of expert e lands at
    # group_start[e] + before[e] + (s − [pairs of this chunk with a smaller expert]).
    key = tl.sort(e * CHUNK + tl.arange(0, CHUNK))
    key_expert = key // CHUNK
    offset = group_start + before - (tl.cumsum(hist, 0) - hist)
    dest = tl.gather(offset, tl.minimum(key_expert, E_BINS - 1), 0) + tl.arange(0, CHUNK)
    tl.store(pairs_ptr + dest, chunk * CHUNK + key % CHUNK, mask=key_expert < num_experts)

    # −1 on the padding rows: the tail of each group (program 0), and everything past the last group.
    if chunk == 0:
        fill_start = group_start + total
        for m0 in range(0, BLOCK_M, 16):
            rows = fill_start[:, None] + m0 + tl.arange(0, 16)[None, :]  # [E_BINS, 16]
            tl.store(pairs_ptr + rows, tl.full([E_BINS, 16], -1, tl.int32), mask=rows < group_end[:, None])
    used_rows = tl.sum(padded)
    for r0 in range(chunk * TILE, capacity, num_programs * TILE):
        rows = r0 + tl.arange(0, TILE)
        tl.store(pairs_ptr + rows, tl.full([TILE], -1, tl.int32), mask=(rows >= used_rows) & (rows < capacity))

    # Each block's expert: the number of groups ending at or before its first row (binary search), −1 past them.
    group_end = tl.where(real, group_end, 2**30)
    num_blocks = capacity // BLOCK_M
    for b0 in range(chunk * TILE, num_blocks, num_programs * TILE):
        blocks = b0 + tl.arange(0, TILE)
        first_row = blocks * BLOCK_M
        found = blocks * 0
        for step in tl.static_range(LOG_BINS - 1, -1, -1):
            probe = found + (1 << step)
            found = tl.where(tl.gather(group_end, probe - 1, 0) <= first_row, probe, found)
        tl.store(block_expert_ptr + blocks, tl.where(found < num_experts, found, -1), mask=blocks < num_blocks)


def build_dispatch(indices: torch.Tensor, num_experts: int, block_m: int, *, backend: Backend = "auto",
                   max_chunk: int = _MAX_CHUNK) -> MoEDispatch:
    """Sort the (token, slot) pairs of `indices [T, k]` (ids in [0, E)) by expert, each group padded to block_m;
    no host sync. A program sorts up to `max_chunk` pairs: one launch when they all fit, else a counting launch
    first. (Ids outside [0, E) are dropped: their pairs appear nowhere.)"""
    _check_dispatch_inputs(indices, num_experts, block_m)
    if max_chunk < 16 or max_chunk & (max_chunk - 1):
        raise ValueError(f"max_chunk must be a power of two >= 16, got {max_chunk}")
    if pick_backend(backend, indices) == "reference":
        return build_dispatch_ref(indices, num_experts, block_m)
    T, k = indices.shape
    num_pairs = T * k
    capacity = dispatch_capacity(num_pairs, num_experts, block_m)
    pairs = torch.empty((capacity,), dtype=torch.int32, device=indices.device)
    block_expert = torch.empty((capacity // block_m,), dtype=torch.int32, device=indices.device)
    if num_pairs == 0:
        return MoEDispatch(pairs, block_expert, block_m)
    chunk = max(16, triton.next_power_of_2(min(num_pairs, max_chunk)))
    num_chunks = triton.cdiv(num_pairs, chunk)
    e_bins = triton.next_power_of_2(num_experts + 1)  # bin E collects padding
    args = (num_pairs, k, indices.stride(0), indices.stride(1), num_experts)
    counts = pairs
    if num_chunks > 1:
        counts = torch.empty((num_chunks, e_bins), dtype=torch.int32, device=indices.device)
        _dispatch_count_kernel[(num_chunks,)](indices, counts, *args, CHUNK=chunk, E_BINS=e_bins,
                                              num_warps=8 if chunk >= 1024 else 4)
    _dispatch_place_kernel[(num_chunks,)](
        indices, counts, pairs, block_expert, *args, num_chunks, capacity,
        BLOCK_M=block_m, CHUNK=chunk, E_BINS=e_bins, LOG_BINS=e_bins.bit_length() - 1, TILE=1024,
        COUNTED=num_chunks > 1, num_warps=8 if chunk >= 1024 else 4,
    )
    return MoEDispatch(pairs, block_expert, block_m)


def build_dispatch_ref(indices: torch.Tensor, num_experts: int, block_m: int) -> MoEDispatch:
    """The same dispatch from torch ops (stable sort, searchsorted, cumsum, scatter): also sync-free, ~25 launches."""
    _check_dispatch_inputs(indices, num_experts, block_m)
    device = indices.device
    flat = indices.reshape(-1).to(torch.int64)  # [P]
    num_pairs = flat.numel()
    capacity = dispatch_capacity(num_pairs, num_experts, block_m)
    sorted_expert, order = torch.sort(flat, stable=True)  # [P]: stable, so token order within an expert
    starts = torch.searchsorted(sorted_expert, torch.arange(num_experts + 1, device=device))  # [E + 1]
    padded = (starts[1:] - starts[:-1] + block_m - 1) // block_m * block_m  # [E]
    padded_end = torch.cumsum(padded, 0)  # [E]
    rank = torch.arange(num_pairs, device=device) - starts[sorted_expert]  # position within its expert's group
    dest = (padded_end - padded)[sorted_expert] + rank  # [P]
    sorted_pairs = torch.full((capacity,), -1, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(0, capacity, block_m, device=device)  # [capacity / block_m]
    expert = torch.searchsorted(padded_end, block_start, right=True)  # E for blocks past the last group
    block_expert = torch.where(expert < num_experts, expert, -1).to(torch.int32)
    return MoEDispatch(sorted_pairs, block_expert, block_m)


def _check_dispatch_inputs(indices: torch.Tensor, num_experts: int, block_m: int) -> None:
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be an int32/int64 [T, k] tensor, got {getattr(indices, 'dtype', indices)} "
                         f"{list(getattr(indices, 'shape', ()))}")
    if num_experts < 1 or block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"num_experts must be >= 1 and block_m a power of two >= 16, got {num_experts}, {block_m}")


# --- kernels ------------------------------------------------------------------------------------
@triton.jit
def _fp4_tile(w_ptr, s_ptr, offs_n, n_ok, k0, k_size, stride_wn, stride_sn,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr):
    """Rows offs_n, inputs [k0, k0 + BLOCK_K) of a packed FP4 weight, dequantized: [BLOCK_K, BLOCK_N] in DTYPE.
    Code c = s·e1·e0·m (bit 3 the sign): its bits placed at fp16 bits 15 and 11-9 read as value · 2^−14 (e = 0
    lands on fp16's subnormals, which conversions keep), so one multiply by 2^(scale byte − 127 + 14) finishes it."""
    G: tl.constexpr = BLOCK_K // 32
    g = tl.arange(0, G)
    kp = k0 // 2 + g[:, None] * 16 + tl.arange(0, 16)[None, :]  # [G, 16]: packed bytes, 16 a scale group
    g_ok = k0 + g * 32 < k_size  # K is a multiple of 32: groups are whole
    b = tl.load(w_ptr + offs_n[:, None, None] * stride_wn + kp[None, :, :],
                mask=n_ok[:, None, None] & g_ok[None, :, None], other=0).to(tl.int32)  # [BN, G, 16]
    s = tl.load(s_ptr + offs_n[:, None] * stride_sn + (k0 // 32 + g)[None, :],
                mask=n_ok[:, None] & g_ok[None, :], other=0).to(tl.int32)  # [BN, G]
    scale = ((s + 14) << 23).to(tl.float32, bitcast=True)[:, :, None]  # exact for scale bytes ≤ 240
    lo = (((b & 0x7) << 9) | ((b & 0x8) << 12)).to(tl.int16).to(tl.float16, bitcast=True)  # element 2i
    hi = (((b & 0x70) << 5) | ((b & 0x80) << 8)).to(tl.int16).to(tl.float16, bitcast=True)  # element 2i + 1
    w = tl.join(lo.to(tl.float32) * scale, hi.to(tl.float32) * scale)  # [BN, G, 16, 2]
    return tl.trans(tl.reshape(w, [BLOCK_N, BLOCK_K]).to(DTYPE))


# e2m1 → bf16 for 8 values a 32-bit word of packed bytes (NVIDIA sm_80+): magnitudes (nibble & 7) index byte
# tables of bf16's high and low bytes with prmt, prmt interleaves them into bf16 pairs, the sign bits are moved in
# with prmt + shift, and one fma.rn.bf16x2 (x · scale − 0) applies the ue8m0 scale: ~3 instructions a value where
# Triton's own unpacking (dot_scaled's upcast) takes ~6-10. Outputs: (e0, e2), (e4, e6) | (e1, e3), (e5, e7).
# Each byte's values take that byte's own scale: $5 holds the scales of bytes 0-1, $6 of bytes 2-3 (pack=4 groups
# whichever 4 elements a thread holds in a row of registers, which need not share a 32-input scale group; the
# first version applied $5 to all four).
_E2M1_BF16_PTX = tl.constexpr("""{
.reg .b32 m, mh, th0, th1, tl0, tl1, h0, l0, h1, l1, sa, sb, t, u, z, nz;
mov.b32 th0, 0x3F3F3F00; mov.b32 th1, 0x40404040; mov.b32 tl0, 0xC0800000; mov.b32 tl1, 0xC0804000;
mov.b32 z, 0; mov.b32 nz, 0x80008000;
and.b32 m, $4, 0x77777777; shr.b32 mh, m, 16;
prmt.b32 h0, th0, th1, m; prmt.b32 l0, tl0, tl1, m; prmt.b32 h1, th0, th1, mh; prmt.b32 l1, tl0, tl1, mh;
prmt.b32 sa, $4, z, 0x1404; prmt.b32 sb, $4, z, 0x3424;
prmt.b32 t, l0, h0, 0x6240; shl.b32 u, sa, 4; and.b32 u, u, 0x80008000; or.b32 t, t, u; fma.rn.bf16x2 $0, t, $5, nz;
prmt.b32 t, l1, h1, 0x6240; shl.b32 u, sb, 4; and.b32 u, u, 0x80008000; or.b32 t, t, u; fma.rn.bf16x2 $1, t, $6, nz;
prmt.b32 t, l0, h0, 0x7351; and.b32 u, sa, 0x80008000; or.b32 t, t, u; fma.rn.bf16x2 $2, t, $5, nz;
prmt.b32 t, l1, h1, 0x7351; and.b32 u, sb, 0x80008000; or.b32 t, t, u; fma.rn.bf16x2 $3, t, $6, nz;
}""")


@triton.jit
def _fp4_tile_ptx(w_ptr, s_ptr, offs_n, n_ok, k0, k_size, stride_wn, stride_sn,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """`_fp4_tile` for bf16 on NVIDIA GPUs, unpacked by `_E2M1_BF16_PTX`."""
    G: tl.constexpr = BLOCK_K // 32
    g = tl.arange(0, G)
    kp = k0 // 2 + g[:, None] * 16 + tl.arange(0, 16)[None, :]
    g_ok = k0 + g * 32 < k_size
    b = tl.load(w_ptr + offs_n[:, None, None] * stride_wn + kp[None, :, :],
                mask=n_ok[:, None, None] & g_ok[None, :, None], other=0)  # [BN, G, 16] uint8
    s = tl.load(s_ptr + offs_n[:, None] * stride_sn + (k0 // 32 + g)[None, :],
                mask=n_ok[:, None] & g_ok[None, :], other=0).to(tl.int32)  # [BN, G]
    # 2^(s − 127) in bf16 is s << 7 (byte 0: the subnormal 2^−127; byte 255, e8m0's NaN: NaN)
    s16 = tl.where(s == 0, 0x40, tl.where(s == 255, 0x7FC0, s << 7)).to(tl.int16).to(tl.bfloat16, bitcast=True)
    scale = tl.broadcast_to(s16[:, :, None], [BLOCK_N, G, 16])
    lo, hi = tl.inline_asm_elementwise(_E2M1_BF16_PTX, "=r,=r,=r,=r,r,r,r", [b, scale],
                                       dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    return tl.trans(tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_K]))


@triton.jit
def _expert_dot(a, acc, w_ptr, s_ptr, offs_n, n_ok, offs_k, k0, k_size, stride_wn, stride_sn,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, W_FMT: tl.constexpr):
    """acc + a [BM, BK] · W^T for rows offs_n of W and inputs [k0, k0 + BK). W_FMT: 0 plain (x's dtype),
    1 packed FP4 dequantized by `_fp4_tile`, 2 packed FP4 through tl.dot_scaled (Triton's own e2m1 upcast where the
    target has no FP4 MMA, the MX FP4 MMA where it has: the same [N, K/2] bytes and [N, K/32] scales), 3 packed FP4
    unpacked by `_fp4_tile_ptx` (bf16 on NVIDIA)."""
    if W_FMT == 0:
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + (k0 + offs_k)[:, None],
                    mask=(offs_k < k_size - k0)[:, None] & n_ok[None, :], other=0.0)
        return tl.dot(a, w, acc, input_precision=PRECISION)
    elif W_FMT == 1:
        w = _fp4_tile(w_ptr, s_ptr, offs_n, n_ok, k0, k_size, stride_wn, stride_sn, BLOCK_N, BLOCK_K, a.dtype)
        return tl.dot(a, w, acc, input_precision=PRECISION)
    elif W_FMT == 3:
        w = _fp4_tile_ptx(w_ptr, s_ptr, offs_n, n_ok, k0, k_size, stride_wn, stride_sn, BLOCK_N, BLOCK_K)
        return tl.dot(a, w, acc)
    else:
        kp = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + kp[:, None],
                    mask=(kp < k_size // 2)[:, None] & n_ok[None, :], other=0)  # [BK/2, BN] packed
        g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        scale = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :],
                        mask=n_ok[:, None] & (g < k_size // 32)[None, :], other=0)  # [BN, BK/32]
        return tl.dot_scaled(a, None, "bf16" if a.dtype == tl.bfloat16 else "fp16", w, scale, "e2m1", acc)


@triton.jit
def _gate_up_kernel(
    x_ptr, w13_ptr, s13_ptr, pairs_ptr, block_expert_ptr, weights_ptr, h_ptr,
    dim, inter, top_k, stride_x, stride_we, stride_wn, stride_se, stride_sn, stride_h, limit,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CLAMP: tl.constexpr,
    PRECISION: tl.constexpr, W_FMT: tl.constexpr,
):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:
        return
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pairs_ptr + rows)
    valid = pair >= 0
    token = (tl.where(valid, pair, 0) // top_k).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < inter
    x_ptrs = x_ptr + token[:, None] * stride_x + offs_k[None, :]  # [BM, BK]
    w_ptr = w13_ptr + expert.to(tl.int64) * stride_we  # W1 rows [0, inter), W3 rows [inter, 2·inter)
    s_ptr = s13_ptr + expert.to(tl.int64) * stride_se
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        a = tl.load(x_ptrs, mask=valid[:, None] & (offs_k < dim - k0)[None, :], other=0.0)
        acc_gate = _expert_dot(a, acc_gate, w_ptr, s_ptr, offs_n, n_ok, offs_k, k0, dim, stride_wn, stride_sn,
                               BLOCK_N, BLOCK_K, PRECISION, W_FMT)
        acc_up = _expert_dot(a, acc_up, w_ptr, s_ptr, offs_n + inter, n_ok, offs_k, k0, dim, stride_wn, stride_sn,
                             BLOCK_N, BLOCK_K, PRECISION, W_FMT)
        x_ptrs += BLOCK_K
    if CLAMP:
        # as torch.clamp: a NaN stays a NaN
        acc_up = tl.minimum(tl.maximum(acc_up, -limit, propagate_nan=tl.PropagateNan.ALL), limit,
                            propagate_nan=tl.PropagateNan.ALL)
        acc_gate = tl.minimum(acc_gate, limit, propagate_nan=tl.PropagateNan.ALL)
    route = tl.load(weights_ptr + pair, mask=valid, other=0.0)  # [BM] fp32
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up * route[:, None]
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_h + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w2_ptr, s2_ptr, pairs_ptr, block_expert_ptr, out_ptr,
    dim, inter, stride_h, stride_we, stride_wn, stride_se, stride_sn, stride_out,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    W_FMT: tl.constexpr,
):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:
        return
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pairs_ptr + rows)
    valid = pair >= 0
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < dim
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_h + offs_k[None, :]  # [BM, BK]
    w_ptr = w2_ptr + expert.to(tl.int64) * stride_we
    s_ptr = s2_ptr + expert.to(tl.int64) * stride_se
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        a = tl.load(h_ptrs, mask=valid[:, None] & (offs_k < inter - k0)[None, :], other=0.0)
        acc = _expert_dot(a, acc, w_ptr, s_ptr, offs_n, n_ok, offs_k, k0, inter, stride_wn, stride_sn,
                          BLOCK_N, BLOCK_K, PRECISION, W_FMT)
        h_ptrs += BLOCK_K
    out_ptrs = out_ptr + tl.where(valid, pair, 0).to(tl.int64)[:, None] * stride_out + offs_n[None, :]
    tl.store(out_ptrs, acc, mask=valid[:, None] & n_ok[None, :])


# --- launch configuration -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MoEConfig:
    """Tiles of both grouped GEMMs (None: `default_moe_config`); block sizes powers of two ≥ 16."""

    block_m: int  # sorted rows a program holds: one expert's group is padded to a multiple of it
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    # FP4 weights: "dot_scaled" (tl.dot_scaled, 16-bit x), "bits" (the kernels' own portable bit ops, any x) or
    # "ptx" (bf16 x on NVIDIA: `_E2M1_BF16_PTX`); fp32 x always takes "bits"
    fp4_unpack: str = "dot_scaled"
    # NVIDIA: cap registers a thread (Triton's maxnreg; 0 none). The FP4 decode tiles take 130-168 registers at 2
    # warps (sm_90), so an SM holds 6-7 programs, 12-14 warps, for a loop that issues ~5-6 instructions a weight
    # value: a cap of 128 lets it hold 8 (bench/bench_quant.py --sweep times it)
    max_regs: int = 0


# (max average rows per touched expert, config), picked from 8-14 candidates timed with CUDA graphs on H200, bf16,
# k=6, dim 4096 (µs, the whole `moe` call; floor = touched weight bytes at 4.3 TB/s or FLOPs at 780 TFLOP/s):
# E=16/inter=512: T=1 31.6 (floor 17.6), T=64 71.4 (46.8), T=256 101.8 (46.8), T=8192 1738 (793);
# E=256/inter=2048 (with a 2048-pair dispatch chunk then, ≈20 µs slower at T=256): T=1 89 (70), T=64 2310 (2376),
# T=256 3074 (2997), T=8192 7812 (3172). The per-expert loop this replaces: 4005 µs at E=16, T=64 (eager).
_CONFIG_TABLE = (
    (16, MoEConfig(16, 32, 128, num_warps=4, num_stages=4)),
    (48, MoEConfig(32, 64, 128, num_warps=4, num_stages=4)),
    (128, MoEConfig(64, 64, 64, num_warps=4, num_stages=4)),
    (None, MoEConfig(128, 128, 64, num_warps=8, num_stages=3)),
)
# AMD: the same tiles, fewer stages where the pipelined tiles overflow the LDS (64 KiB on gfx942 / MI300X, 160 KiB
# on gfx950 / MI355X): stages for each row above. Compile-checked (tests/kernels/test_amd_compile.py), not timed.
_AMD_STAGES = {"gfx942": (4, 2, 3, 2), "gfx950": (4, 3, 4, 3)}


def default_moe_config(num_pairs: int, num_experts: int, dtype: torch.dtype, arch: str | None = None) -> MoEConfig:
    """The table's row for the average rows per expert (a shape, never a value: CUDA graphs stay valid); `arch`
    (kernels/device.py's amd_arch) picks the AMD stages."""
    rows_per_expert = num_pairs / max(1, min(num_experts, num_pairs))
    row = next(i for i, (limit, _) in enumerate(_CONFIG_TABLE) if limit is None or rows_per_expert <= limit)
    config = _CONFIG_TABLE[row][1]
    if arch in _AMD_STAGES:
        config = MoEConfig(config.block_m, config.block_n, config.block_k, config.num_warps, _AMD_STAGES[arch][row])
    if dtype == torch.float32:  # twice the bytes a tile: fewer stages fit in shared memory
        config = MoEConfig(config.block_m, config.block_n, min(config.block_k, 64), config.num_warps, 2)
    return config


# FP4 weights: a tile is a quarter of the bf16 bytes, and dequantizing it in registers costs ALU work a weight
# (bit ops, a convert, a multiply), which bounds decode: at 3.35 TB/s (H100) the SMs issue ~4.4 lane-instructions
# a weight value, so a loop at 6 a value cannot stream at the byte rate. Decode row (compiled for sm_90 with Triton
# 3.9, SASS instructions of the K loop a weight value, gate/up and down): 16×64×256 with 4 warps 10-20 (255
# registers and spills); 16×64×128, 4 warps 6.4 / 7.2; 2 warps 5.4 / 5.5 (fewer warps each re-read less of the
# dot operands); 16×32×128, 2 warps 5.7 / 6.3. At ≤ 16 rows an expert the tile narrows along N
# (`_FP4_DECODE_BLOCK_N`) until the touched experts' tiles give ≥ _FP4_DECODE_PROGRAMS programs an SM (V4-Flash,
# one token: 6 experts × 2048/64 = 192 gate/up programs on 132 SMs leave a second wave 45% full; 32 wide: 384).
# Stages per AMD target as above.
_FP4_CONFIG_TABLE = (
    (16, MoEConfig(16, 64, 128, num_warps=2, num_stages=4)),
    (48, MoEConfig(32, 64, 256, num_warps=4, num_stages=3)),
    (128, MoEConfig(64, 64, 128, num_warps=4, num_stages=3)),
    (None, MoEConfig(128, 128, 64, num_warps=8, num_stages=3)),
)
_FP4_AMD_STAGES = {"gfx942": (2, 2, 2, 2), "gfx950": (3, 3, 3, 3)}
_FP4_DECODE_BLOCK_N = (64, 32)  # widest first
_FP4_DECODE_PROGRAMS = 2


def default_moe_fp4_config(num_pairs: int, num_experts: int, dtype: torch.dtype, arch: str | None = None, *,
                           inter: int = 0, num_sms: int = 0) -> MoEConfig:
    """`default_moe_config` for packed FP4 weights: its own table (above), the same row choice; with `inter` and
    `num_sms` (shapes only: CUDA graphs stay valid) the decode row narrows its N tile to fill the GPU."""
    rows_per_expert = num_pairs / max(1, min(num_experts, num_pairs))
    row = next(i for i, (limit, _) in enumerate(_FP4_CONFIG_TABLE) if limit is None or rows_per_expert <= limit)
    c = _FP4_CONFIG_TABLE[row][1]
    stages = _FP4_AMD_STAGES[arch][row] if arch in _FP4_AMD_STAGES else c.num_stages
    if dtype == torch.float32:
        return MoEConfig(c.block_m, c.block_n, min(c.block_k, 64), c.num_warps, 2)
    block_n = c.block_n
    if row == 0 and num_sms and arch is None and dtype == torch.bfloat16:
        # an NVIDIA GPU with bf16 x: the PTX unpack on 32-row N tiles, the best of bench_quant.py's decode sweep at
        # T = 1, 8 and 64 on an H200 (2026-12-06: 21/32/35% of the byte floor against 17/24/26% through dot_scaled)
        return MoEConfig(c.block_m, 32, c.block_k, c.num_warps, stages, "ptx")
    if row == 0 and inter and num_sms:
        touched = min(num_experts, num_pairs)
        block_n = next((n for n in _FP4_DECODE_BLOCK_N
                        if touched * triton.cdiv(inter, n) >= _FP4_DECODE_PROGRAMS * num_sms), _FP4_DECODE_BLOCK_N[-1])
    return MoEConfig(c.block_m, block_n, c.block_k, c.num_warps, stages)


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def _check_config(config: MoEConfig) -> None:
    for name in ("block_m", "block_n", "block_k"):
        v = getattr(config, name)
        if v < 16 or v & (v - 1):
            raise ValueError(f"config.{name} must be a power of two >= 16, got {v}")
    if config.fp4_unpack not in ("dot_scaled", "bits", "ptx"):
        raise ValueError(f"config.fp4_unpack must be 'dot_scaled', 'bits' or 'ptx', got {config.fp4_unpack!r}")
    if config.max_regs and not 24 <= config.max_regs <= 255:
        raise ValueError(f"config.max_regs must be 0 or in [24, 255], got {config.max_regs}")


# --- public API ---------------------------------------------------------------------------------
def _check_inputs(x, weights, indices, w13, w2) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a [T, dim] tensor, got {list(getattr(x, 'shape', ()))}")
    T, dim = x.shape
    if w13.dim() != 3 or w13.shape[2] != dim or w13.shape[1] % 2:
        raise ValueError(f"w13 must be [E, 2·inter, dim={dim}], got {list(w13.shape)}")
    E, inter = w13.shape[0], w13.shape[1] // 2
    if tuple(w2.shape) != (E, dim, inter):
        raise ValueError(f"w2 must be [E={E}, dim={dim}, inter={inter}], got {list(w2.shape)}")
    _check_routing(x, weights, indices)
    if not (x.dtype == w13.dtype == w2.dtype):
        raise TypeError(f"x, w13 and w2 must share a dtype, got {x.dtype}, {w13.dtype}, {w2.dtype}")
    for name, t in (("w13", w13), ("w2", w2)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")


def _check_routing(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> None:
    T = x.shape[0]
    if indices.dim() != 2 or indices.shape[0] != T or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32/int64 [T={T}, k], got {indices.dtype} {list(indices.shape)}")
    if tuple(weights.shape) != tuple(indices.shape) or weights.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"weights must be fp32 {list(indices.shape)}, got {weights.dtype} {list(weights.shape)}")
    for name, t in (("weights", weights), ("indices", indices)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")


def moe(
    x: torch.Tensor,  # [T, dim]
    weights: torch.Tensor,  # [T, k] fp32 routing weights
    indices: torch.Tensor,  # [T, k] expert ids in [0, E)
    w13: torch.Tensor,  # [E, 2·inter, dim]: W1 (gate) rows, then W3 (up) rows
    w2: torch.Tensor,  # [E, dim, inter]
    swiglu_limit: float,
    *,
    out: torch.Tensor | None = None,  # [T, k, dim] fp32: receives each (token, slot)'s expert output
    backend: Backend = "auto",
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """Σ over the k routed experts of each token, fp32 [T, dim] (module docstring); no host sync on Triton.

    `out`, if given, receives the per-(token, slot) outputs that are summed (the Triton path writes every one
    of them; the reference leaves it untouched).
    """
    _check_inputs(x, weights, indices, w13, w2)
    _check_out(out, x, indices)
    if config is not None:
        _check_config(config)
    if pick_backend(backend, x, weights, indices, w13, w2) == "reference":
        return moe_ref(x, weights, indices, w13, w2, swiglu_limit)
    if not w13.is_contiguous() or not w2.is_contiguous():
        raise ValueError(f"w13 and w2 must be contiguous, got strides {w13.stride()}, {w2.stride()}")
    return _launch_experts(x, weights, indices, (w13, None), (w2, None), w13.shape[1] // 2, swiglu_limit, out, config)


def _check_out(out: torch.Tensor | None, x: torch.Tensor, indices: torch.Tensor) -> None:
    T, dim = x.shape
    k = indices.shape[1]
    if out is not None and (tuple(out.shape) != (T, k, dim) or out.dtype != torch.float32
                            or not out.is_contiguous() or out.device != x.device):
        raise ValueError(f"out must be a contiguous fp32 [T={T}, k={k}, dim={dim}] tensor on {x.device}, got "
                         f"{out.dtype} {list(out.shape)} on {out.device}")


# The PTX unpack is a decode tile's option: at block_m >= 64 Triton 3.6's TritonGPUOptimizeDotOperands pass fails on
# the unpacked tile feeding the dot for sm_90 (seen on H200; Triton 3.9 compiles it), so wider tiles take dot_scaled.
PTX_MAX_BLOCK_M = 32


def _weight_format(fp4: bool, x: torch.Tensor, config: MoEConfig) -> int:
    """The kernels' W_FMT: 0 plain weights, 1 FP4 by `_fp4_tile`, 2 FP4 through tl.dot_scaled, 3 FP4 by
    `_fp4_tile_ptx` (config.fp4_unpack; fp32 x takes 1; tiles wider than PTX_MAX_BLOCK_M rows take 2). Compiled
    for H200 (sm_90), a weight of the decode tiles
    took ~10 SASS instructions through dot_scaled, ~13 through `_fp4_tile`."""
    if not fp4:
        return 0
    if x.dtype == torch.float32 or config.fp4_unpack == "bits":
        return 1
    if config.fp4_unpack == "ptx":
        if x.dtype != torch.bfloat16 or torch.version.hip or x.device.type != "cuda":
            raise ValueError(f"fp4_unpack='ptx' takes bf16 x on an NVIDIA GPU, got {x.dtype} on {x.device}")
        if config.block_m <= PTX_MAX_BLOCK_M:
            return 3
    return 2


def _launch_experts(x, weights, indices, w13, w2, inter: int, swiglu_limit: float, out, config) -> torch.Tensor:
    """Dispatch, then both grouped GEMMs; w13 and w2 are (weight, None) or (packed FP4, scale bytes)."""
    if x.dtype not in _DTYPES or weights.dtype != torch.float32:
        raise TypeError(f"Triton MoE takes x/weights in {_DTYPES} and fp32 routing weights, got {x.dtype}, "
                        f"{weights.dtype}")
    if x.stride(1) != 1:
        raise ValueError(f"x needs a unit last stride, got strides {x.stride()}")
    (w13, s13), (w2, s2) = w13, w2
    fp4 = s13 is not None
    T, dim = x.shape
    E, k = w13.shape[0], indices.shape[1]
    num_pairs = T * k
    if num_pairs == 0:
        return x.new_zeros((T, dim), dtype=torch.float32)
    arch = amd_arch(x.device)
    if config is None:
        config = (default_moe_fp4_config(num_pairs, E, x.dtype, arch, inter=inter, num_sms=_num_sms(x.device)) if fp4
                  else default_moe_config(num_pairs, E, x.dtype, arch))
    plan = build_dispatch(indices, E, config.block_m, backend="triton")
    num_blocks = plan.block_expert.shape[0]
    h = torch.empty((plan.sorted_pairs.shape[0], inter), dtype=x.dtype, device=x.device)  # [capacity, inter]
    out = torch.empty((T, k, dim), dtype=torch.float32, device=x.device) if out is None else out
    # tf32 is ignored for 16-bit operands. AMD gets "ieee": Triton checks the option against the target before
    # the operand types and gfx950 has no tf32, so "tf32" did not compile for MI355X (test_amd_compile.py).
    precision = "ieee" if x.dtype == torch.float32 or arch else "tf32"
    limit = float(swiglu_limit)
    s13, s2 = (s13, s2) if fp4 else (w13, w2)  # unread without FP4
    scale_strides = lambda s: (s.stride(0), s.stride(1)) if fp4 else (0, 0)  # noqa: E731
    tiles = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, PRECISION=precision,
                 W_FMT=_weight_format(fp4, x, config), num_warps=config.num_warps, num_stages=config.num_stages,
                 **({"maxnreg": config.max_regs} if config.max_regs and not torch.version.hip else {}))
    _gate_up_kernel[(num_blocks, triton.cdiv(inter, config.block_n))](
        x, w13, s13, plan.sorted_pairs, plan.block_expert, weights.reshape(-1).contiguous(), h,
        dim, inter, k, x.stride(0), w13.stride(0), w13.stride(1), *scale_strides(s13), h.stride(0), limit,
        CLAMP=limit > 0, **tiles,
    )
    _down_kernel[(num_blocks, triton.cdiv(dim, config.block_n))](
        h, w2, s2, plan.sorted_pairs, plan.block_expert, out,
        dim, inter, h.stride(0), w2.stride(0), w2.stride(1), *scale_strides(s2), dim, **tiles,
    )
    return out.sum(1)


def moe_ref(
    x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
    swiglu_limit: float,
) -> torch.Tensor:
    """Plain PyTorch, a loop over the experts present (host syncs): products of x's dtype accumulated in fp32
    (fp64 for fp64 inputs), h rounded to x's dtype as the kernel stores it; returns fp32 (fp64) [T, dim]."""
    _check_inputs(x, weights, indices, w13, w2)
    inter = w13.shape[1] // 2
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.zeros(x.shape, dtype=acc, device=x.device)
    for e in torch.unique(indices).tolist():
        rows, slot = torch.where(indices == e)
        xe = x[rows].to(acc)
        gate = F.linear(xe, w13[e, :inter].to(acc))
        up = F.linear(xe, w13[e, inter:].to(acc))
        if swiglu_limit > 0:
            up = up.clamp(-swiglu_limit, swiglu_limit)
            gate = gate.clamp(max=swiglu_limit)
        h = (F.silu(gate) * up * weights[rows, slot, None].to(acc)).to(x.dtype)
        y.index_add_(0, rows, F.linear(h.to(acc), w2[e].to(acc)))
    return y


# --- FP4 experts --------------------------------------------------------------------------------
FP4_GROUP = 32  # inputs sharing one ue8m0 scale along a weight row
# e2m1 code → value: bit 3 the sign, bits 2-1 the exponent (bias 1), bit 0 the mantissa
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _check_fp4(name: str, packed: torch.Tensor, scale: torch.Tensor) -> None:
    if packed.dtype not in (torch.uint8, torch.int8) or scale.dtype not in (torch.uint8, torch.int8):
        raise TypeError(f"{name} and its scale must be uint8 (packed e2m1, ue8m0 bytes), got {packed.dtype}, "
                        f"{scale.dtype}")
    if packed.dim() < 1 or tuple(scale.shape) != (*packed.shape[:-1], packed.shape[-1] * 2 // FP4_GROUP) \
            or (packed.shape[-1] * 2) % FP4_GROUP:
        raise ValueError(f"{name} [..., K/2] needs K a multiple of {FP4_GROUP} and a scale [..., K/{FP4_GROUP}], "
                         f"got {list(packed.shape)} and {list(scale.shape)}")


def dequant_fp4(packed: torch.Tensor, scale_bytes: torch.Tensor) -> torch.Tensor:
    """Packed e2m1 [..., K/2] (low nibble = element 2i, high = 2i+1) times ue8m0 scales [..., K/32]
    (2^(byte − 127)) → fp32 [..., K]; exact (a 2-bit significand times a power of two)."""
    _check_fp4("packed", packed, scale_bytes)
    b = packed.view(torch.uint8).to(torch.int64)
    table = torch.tensor(_E2M1, dtype=torch.float32, device=packed.device)
    values = torch.stack([table[b & 0xF], table[b >> 4]], dim=-1).flatten(-2)  # [..., K]
    exponent = scale_bytes.view(torch.uint8).to(torch.int32) - 127
    scale = torch.ldexp(torch.ones(exponent.shape, device=packed.device), exponent)  # [..., K/32]
    return (values.unflatten(-1, (-1, FP4_GROUP)) * scale[..., None]).flatten(-2)


def _check_fp4_experts(x, w13, w13_scale, w2, w2_scale) -> tuple[int, int, int]:
    _check_fp4("w13", w13, w13_scale)
    _check_fp4("w2", w2, w2_scale)
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a [T, dim] tensor, got {list(getattr(x, 'shape', ()))}")
    dim = x.shape[1]
    if w13.dim() != 3 or w13.shape[2] * 2 != dim or w13.shape[1] % 2:
        raise ValueError(f"w13 must be packed [E, 2·inter, dim/2={dim // 2}], got {list(w13.shape)}")
    E, inter = w13.shape[0], w13.shape[1] // 2
    if tuple(w2.shape) != (E, dim, inter // 2) or inter % FP4_GROUP:
        raise ValueError(f"w2 must be packed [E={E}, dim={dim}, inter/2={inter // 2}] with inter a multiple of "
                         f"{FP4_GROUP}, got {list(w2.shape)}")
    for name, t in (("w13", w13), ("w13_scale", w13_scale), ("w2", w2), ("w2_scale", w2_scale)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    return E, dim, inter


def moe_fp4_ref(
    x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor,
    w2: torch.Tensor, w2_scale: torch.Tensor, swiglu_limit: float,
) -> torch.Tensor:
    """`dequant_fp4` of both weights, cast to x's dtype (exact for bf16/fp32/fp64, and for fp16 scales in its
    range), then `moe_ref`: fp32 (fp64) [T, dim]."""
    _check_fp4_experts(x, w13, w13_scale, w2, w2_scale)
    return moe_ref(x, weights, indices, dequant_fp4(w13, w13_scale).to(x.dtype), dequant_fp4(w2, w2_scale).to(x.dtype),
                   swiglu_limit)


def moe_fp4(
    x: torch.Tensor,  # [T, dim]
    weights: torch.Tensor,  # [T, k] fp32 routing weights
    indices: torch.Tensor,  # [T, k] expert ids in [0, E)
    w13: torch.Tensor,  # [E, 2·inter, dim/2] uint8: packed e2m1, W1 (gate) rows then W3 (up) rows
    w13_scale: torch.Tensor,  # [E, 2·inter, dim/32] uint8: ue8m0 exponent bytes
    w2: torch.Tensor,  # [E, dim, inter/2] uint8
    w2_scale: torch.Tensor,  # [E, dim, inter/32] uint8
    swiglu_limit: float,
    *,
    out: torch.Tensor | None = None,  # [T, k, dim] fp32: receives each (token, slot)'s expert output
    backend: Backend = "auto",
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """`moe` with FP4 experts: the same routing, clamp, SwiGLU and routing weights, fp32 [T, dim]; the weights
    stay packed as the checkpoint stores them (the MX FP4 layout an FP4 MFMA reads: module docstring) and are
    dequantized in registers, as `moe_fp4_ref` does in memory. int8 views of the same bytes are accepted."""
    E, dim, inter = _check_fp4_experts(x, w13, w13_scale, w2, w2_scale)
    _check_routing(x, weights, indices)
    _check_out(out, x, indices)
    if config is not None:  # checked whichever backend runs (as `moe` does): a bad config is the caller's error
        _check_config(config)
        if config.block_k < FP4_GROUP:
            raise ValueError(f"FP4 experts need config.block_k >= {FP4_GROUP}, got {config.block_k}")
    if pick_backend(backend, x, weights, indices, w13, w13_scale, w2, w2_scale) == "reference":
        return moe_fp4_ref(x, weights, indices, w13, w13_scale, w2, w2_scale, swiglu_limit)
    packed = [t.view(torch.uint8) for t in (w13, w13_scale, w2, w2_scale)]
    if not all(t.is_contiguous() for t in packed):
        raise ValueError("w13, w2 and their scales must be contiguous")
    return _launch_experts(x, weights, indices, (packed[0], packed[1]), (packed[2], packed[3]), inter, swiglu_limit,
                           out, config)

