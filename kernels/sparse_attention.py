"""Sparse MQA attention with a per-head attention sink (decode and prefill), and its LSE merge.

For token t, head h and the valid keys j of `indices[t]` (row ids into `kv`; K = V, one shared head):

    s_j      = scale · q[t, h] · kv[j]
    out[t,h] = Σ_j e^{s_j} kv[j] / (Σ_j e^{s_j} + e^{attn_sink[h]})
    lse[t,h] = log Σ_j e^{s_j}            (the sink not included; −inf when no key is valid, and then out = 0)

(docs/dsv4-spec.md, "Attention layer", step 5.) An index < 0 is padding, anywhere in a row; a repeated index
counts as many times as it appears. Indices ≥ R are a caller error: the reference raises, the Triton
kernel skips them rather than read out of bounds.

`merge_attn` (kernels/attn_merge.py, re-exported here) combines two results of `sparse_attn` over
disjoint key sets into the result over their union, the sink counted once.

Kernel: one program per (token, block of BLOCK_H heads, key split). It holds the q tile [BLOCK_H, D],
gathers BLOCK_N rows of `kv` per step (cp.async, num_stages deep) and runs an online softmax in the exp2
domain with fp32 accumulators; every gathered row serves all heads of the block (MQA). When the
programs cannot fill the GPU (small decode batches), the keys are split across programs that write
fp32 partials normalised by their own sum, and a second kernel merges them by LSE and applies the sink
once, or (`fused_merge`) the last program of each head block merges them (atomic ticket; one online pass over
the splits, a few splits a load: `_merge_block`). `default_config` is the launch table (measured on H100,
bench/RESULTS.md).

KV rows: float rows `kv` [R, D] in q's dtype, or FP8 KV rows (`kv_layout`, kernels/kv_rows.py: kv [R, row_bytes]
uint8, e4m3fn nope codes with a power-of-two scale per 64, rope dims in the layout's dtype) dequantized in
registers as they are gathered (the code bits placed in an fp16, times 2^8·scale: exact, integer ops only, the
same on NVIDIA, AMD and the interpreter), then cast to q's dtype for the dots: the result is the attention over
the dequantized rows. `SparseAttnConfig.dequant` picks how: "bits" (that, the default), "cvt" (the codes converted
as float8e4nv, sm_90's cvt.rn.f16x2.e4m3x2, then times the scale in fp32: fewer instructions a value), or
"cvt_chunks" (converted, unscaled, and the scales applied outside the tile: S = Σ_c (q_c · codes_cᵀ) · scale_c and
PV_c = (P · scale_c) · codes_c over the 64-column chunks c, batched dots; exact in bf16/fp32, not in fp16). All three
compute the same function within the dots' rounding (tests/kernels/test_sparse_attention.py). The reference
dequantizes the gathered rows with `unpack_kv_rows`. V4's rows are gathered as
tiles of their own size (codes, one 8-byte scale word, 64 rope dims: `_gather_fp8_compact`; all three pipelined
by 8-byte cp.async, the widest a 584-byte row allows). The dequantized key tile is held in registers, so FP8 rows
take the bf16 rows' head blocks and splits with 8 warps and shorter key steps (`default_config`: no spills on
sm_90); `smem_bytes` models each launch's shared memory from its tiles (checked against the sm_90 compiler on the
CPU) and `fit_shared_memory` keeps the table's choice within the card's opt-in limit.

Supported: q/kv in bf16, fp16 or fp32 (same dtype), or q with FP8 KV rows; on Triton 16 ≤ D ≤ 512 and K ≤ 131072 (the
reference takes any); any H (blocks are masked); CUDA-graph capture (no host sync, fixed launch shapes).
bf16 dots are not supported by the Triton interpreter: CPU tests use fp16/fp32. Portability: plain
Triton; BLOCK_H ≥ 16 so every tl.dot tile is ≥ 16×16 (AMD MFMA lowering needs it, also when H = 16);
the fp32 path asks for IEEE dots (tf32 would cost ~3e-4 of accuracy); on AMD GPUs `default_config` picks
tiles that compile without spills for MI355X and MI300X (compile-checked, not timed: no AMD device yet).

Known limits (H100): large decode batches reach ~65% of the byte floor at H = 64 and ~37% at H = 128:
one 8-warp CTA per SM (245 regs/thread), whose 32-key step is a serial chain (S wgmma, softmax, P
through shared memory, PV wgmma) of ~2.3 µs. T = 1 costs ~9-12 µs: two launches and two dependent
DRAM round trips (indices, then rows), against a byte floor under 0.5 µs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sparsepd.kernels.attn_merge import check_out, lse_dtype, merge_attn, merge_attn_ref
from sparsepd.kernels.device import Backend, amd_arch, pick_backend
from sparsepd.kernels.kv_rows import KVRowLayout, _e4m3fn_cvt, _e4m3fn_dequant, check_rows, unpack_kv_rows

__all__ = ["SM90_SMEM_BYTES", "SparseAttnConfig", "default_config", "fit_shared_memory", "merge_attn", "merge_attn_ref",
           "smem_bytes", "sparse_attn", "sparse_attn_ref"]

_LOG2E = 1.4426950408889634
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MAX_TRITON_D = 512
_MAX_KEYS_PER_SPLIT = 2048  # a split's indices are loaded at once: 2 index blocks, 256 and 2048
_MAX_SPLITS = 64
SM90_SMEM_BYTES = 232448  # H100/H200: shared memory a block may opt into (227 KiB)
DEQUANT_MODES = ("bits", "cvt", "cvt_chunks")  # SparseAttnConfig.dequant; the kernel's DEQUANT is the index


@dataclass(frozen=True, slots=True)
class SparseAttnConfig:
    """Launch parameters of the Triton path (the default comes from `default_config`)."""

    block_h: int  # heads per program; ≥ 16 (tl.dot tile rows, AMD MFMA)
    block_n: int  # keys gathered per loop step; ≥ 16
    num_splits: int  # key splits per (token, head block); > 1 adds the merge kernel
    num_warps: int
    num_stages: int
    skip_empty: bool = True  # branch over all-padding key blocks (also changes the S tile's warp layout)
    fused_merge: bool = False  # split launches: the last program of a head block merges (no second launch)
    # FP8 KV rows' dequantization (ignored for float rows): "bits" builds the values from the code bits with integer
    # ops (every target, the default); "cvt" converts the codes as float8e4nv (Hopper's and gfx950's hardware
    # conversion) and multiplies by the scale; "cvt_chunks" converts them too but keeps the scales out of the key
    # tile: S = Σ_chunk (q_chunk · codes_chunk) · scale and PV = Σ_chunk (P · scale_chunk) · codes_chunk (batched
    # dots over the 64-column chunks; compact rows, q in bf16 or fp32). `DEQUANT_MODES`.
    dequant: str = "bits"


def default_config(T: int, H: int, K: int, D: int, num_sms: int, arch: str | None = None,
                   fp8_rows: bool = False, smem_limit: int = SM90_SMEM_BYTES,
                   kv_layout: KVRowLayout | None = None) -> SparseAttnConfig:
    """The launch table, set from a sweep of ~1000 variants on H100 (bench/RESULTS.md): within 1.13×
    of the best variant at every benchmarked decode and prefill shape, and equal to it at most.

    - 16-head blocks while T · H/16 programs fit in one wave (small decode batches: each row is then
      read H/16 times, all but once from L2), else 64-head blocks (each row read once per 64 heads; fp32
      acc [64, 512] = 128 regs/thread at 8 warps, so one CTA per SM).
    - Keys split to fill the SMs: num_sms // programs splits, or all the way down to 32-key splits
      when that is at most twice as many (T = 1).
    - 64-key steps for an unsplit 16-head launch of one wave (more bytes in flight per CTA), else 32.
    Registers/shared memory per CTA at D = 512 (H100): h16/n32/st3 190 regs, 83 KiB (two CTAs per SM);
    h16/n64/st3 254, 150 KiB; h64/n32/st3 245, 172 KiB.

    AMD (`arch` = kernels/device.py's amd_arch, num_sms = CUs): tiles that compile without spills or scratch for
    gfx950 (MI355X) and gfx942 (MI300X) at every launch of the project's shapes (tests/kernels/test_amd_compile.py;
    chosen by compiling only, not timed), all at 4 warps without skip_empty: an 8-warp workgroup leaves a wave
    256 VGPRs, and h64/n32/w8 spilled ~100 to scratch on both. gfx950: h16/n32/st3 (≤ 384 VGPRs with AGPRs,
    32 KiB LDS; n64 spilled 254 VGPRs) and h64/n16/st2 (≤ 337, 64 KiB; 32-key steps spilled 30-60 SGPRs).
    gfx942 and other AMD targets: 16-key steps, 2 stages, 32-head blocks once a wave is full (h16 ≤ 262 VGPRs,
    16 KiB; h32 ≤ 265, 32 KiB): with 32-bit buffer addressing (tensors under 2 GiB) h16/n32 spilled 13 SGPRs and
    h64/n16 7, and n64 needs 128 KiB of LDS (gfx942 has 64).
    NVIDIA FP8 KV rows (`fp8_rows`) keep the head blocks and splits (the same grid) but take 8 warps, 32-key
    steps and 4 stages on 16-head blocks, 16-key steps and 5 stages on 64-head blocks (48-64 keys in flight, as the
    bf16 tiles' 64). Their gather dequantizes the whole [block_n, BLOCK_D] key tile in registers before the dots
    read it from shared memory (float rows go from the cp.async buffer to the MMA without registers), so the bf16
    tiles spilled on sm_90 (ptxas, CPU compile, 2026-12-06): h16/n64/w4 255 regs and 2,312 bytes of spill stores
    (T = 32, H = 64: 412 µs against 47 µs for bf16 rows on an H200), h16/n32/w4 292 bytes (T = 1), h64/n32/w8 112
    bytes (T ≥ 64 at 64/128 heads, prefill; 84 with the scale word). h16/n32/w8/st4: 220 regs, h64/n16/w8/st5:
    255, neither spills. (Untimed as of 2026-12-06: bench_sparse_attention.py times them against the bf16 tiles.)
    NVIDIA: the table's tiles are then fitted to `smem_limit` (the card's opt-in shared memory a block) by
    `fit_shared_memory`, for float rows (bf16 at V4's D) or FP8 KV rows (V4's layout): fewer stages first, then
    shorter key steps; at D = 512 every table row fits an H100/H200 (227 KiB) unchanged (FP8 rows: h16/n32/st4
    141 KiB, h64/n16/st5 128 KiB).

    AMD FP8 KV rows (`fp8_rows`: the dequantization's addresses and integer work) spilled 11-23 SGPRs at gfx950's
    h16/n32/st3 and 2-19 at gfx942's h32/n16/st2 and h16/n16/st2: they take 16-key steps and 2 stages on gfx950's
    16-head blocks, and one stage on gfx942 (h32/n16/st1: ≤ 245 VGPRs, ≤ 84 SGPRs, 32 KiB).

    FP8 rows' dequantization (`SparseAttnConfig.dequant`) stays "bits" on every target until a device run of
    `bench/bench_sparse_attention.py --quick --rows fp8` shows another faster: its "FP8 cvt" and "FP8 cvt_chunks"
    columns time the table's tile with each, and the default changes per NVIDIA row (head block) only where one is
    faster at every shape that row serves (T = 1, T ≥ 32 decode, prefill), beyond the spread of two timings of the
    same launch. Compiled for sm_90 on the CPU (2026-12-07): "cvt" 219 regs at h16/n32/w8/st4 and 254 at
    h64/n16/w8/st5, no spills ("bits": 220, 255); "cvt_chunks" 172 regs at h16 but 324 bytes of spills at h64 (its
    batched dots take mma.sync, not wgmma). AMD: both compile for gfx950 and gfx942 at the table's FP8 tiles
    (gfx942 has no OCP e4m3 conversion instruction: Triton converts it in software there); "cvt_chunks" spills
    2-8 SGPRs on gfx950. AMD keeps "bits" (untimed).
    """
    big_h = 64 if arch is None or arch == "gfx950" else 32
    block_h = 16 if H <= 16 or T * triton.cdiv(H, 16) <= num_sms else min(big_h, triton.next_power_of_2(H))
    programs = T * triton.cdiv(H, block_h)
    most_splits = triton.cdiv(K, 32)
    target = max(1, num_sms // programs)
    num_splits = most_splits if 2 * target >= most_splits else target
    if arch is not None:
        block_n, num_stages = (32, 3) if arch == "gfx950" and block_h == 16 and not fp8_rows else (16, 2)
        if fp8_rows and arch != "gfx950":
            num_stages = 1
        return SparseAttnConfig(block_h, block_n, num_splits, num_warps=4, num_stages=num_stages, skip_empty=False)
    block_n = 64 if block_h == 16 and num_splits == 1 and programs <= num_sms else 32
    config = SparseAttnConfig(block_h, block_n, num_splits, num_warps=8 if block_h == 64 else 4,
                              num_stages=3, skip_empty=block_h == 64)
    if fp8_rows:  # the dequantized key tile is held in registers: 8 warps, shorter key steps (no spills)
        config = dataclasses.replace(config, block_n=32 if block_h == 16 else 16, num_warps=8,
                                     num_stages=4 if block_h == 16 else 5)
    if kv_layout is None and fp8_rows and D > 64:  # rows of the V4 kind: 64-multiple nope dims, bf16 rope
        kv_layout = KVRowLayout(D, D % 64 or 64, torch.bfloat16)
    return fit_shared_memory(config, D, 2, kv_layout, smem_limit)


def smem_bytes(config: SparseAttnConfig, D: int, q_bytes: int, kv_layout: KVRowLayout | None = None) -> int:
    """Shared memory one `_sparse_attn_fwd` program asks on NVIDIA sm_90 (Triton 3.6-3.9), from its tiles: the
    larger of the loop's buffers and the epilogue's fp32 [block_h, BLOCK_D] layout change, plus 2.5 KiB of
    reductions and alignment. The loop holds num_stages − 1 gathered key blocks (cp.async), q, and the dots'
    operand copies: 16-head tiles (mma.sync) read float rows from the gathered blocks but dequantized FP8 rows
    from two copies (one a dot); 64-head tiles (wgmma, block_h ≥ 64) one copy of the rows and two of P. The
    "cvt_chunks" dequantization keeps two copies of the converted codes at every tile and no epilogue layout
    change (its accumulator is built from 64-column dots). Equal to the compiler's figure, or at most ~64 KiB
    above it for the wide FP8 gather, at every tile the tests compile for sm_90 on the CPU
    (tests/kernels/test_sparse_attention_smem.py; "cvt_chunks" at 16, 32 and 64 heads, bf16 and fp32 q: within
    2.5 KiB above, bench/RESULTS.md 2026-12-07)."""
    bd = max(16, triton.next_power_of_2(D))
    n, bh = config.block_n, config.block_h
    if kv_layout is None:
        key_bytes = bd * q_bytes
    elif _compact_rows(kv_layout):
        key_bytes = bd + 64 * kv_layout.rope_bytes  # codes, rope dims (the 8-byte scale tile: within the margin)
    else:
        key_bytes = bd + bd + bd * kv_layout.rope_bytes  # codes, a scale byte per column, a BLOCK_D rope tile
    wgmma = bh >= 64
    chunks = kv_layout is not None and config.dequant == "cvt_chunks"
    if chunks:
        operands = 2 * n * bd * q_bytes
    elif wgmma:
        operands = n * bd * q_bytes + 2 * bh * n * q_bytes
    else:
        operands = 0 if kv_layout is None else 2 * n * bd * q_bytes
    loop = (config.num_stages - 1) * n * key_bytes + bh * bd * q_bytes + operands
    return max(loop, bh * bd * 4 if wgmma and not chunks else 0) + 2560


def fit_shared_memory(config: SparseAttnConfig, D: int, q_bytes: int, kv_layout: KVRowLayout | None,
                      limit: int) -> SparseAttnConfig:
    """`config` with fewer stages (down to 2), then shorter key steps (down to 16), until `smem_bytes` ≤ limit;
    raises when even 16-key steps with 2 stages do not fit."""
    while smem_bytes(config, D, q_bytes, kv_layout) > limit:
        if config.num_stages > 2:
            config = dataclasses.replace(config, num_stages=config.num_stages - 1)
        elif config.block_n > 16:
            config = dataclasses.replace(config, block_n=config.block_n // 2)
        else:
            raise ValueError(f"no sparse attention tile fits {limit} bytes of shared memory at D={D}: {config} "
                             f"needs {smem_bytes(config, D, q_bytes, kv_layout)}")
    return config


# ----------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _block_softmax(s, m_i, m_use, dtype: tl.constexpr):
    """exp2 weights of one key block (cast for the PV dot), the rescale of the old sums, the row sums."""
    p = tl.exp2(s - m_use[:, None])
    return tl.exp2(m_i - m_use), p.to(dtype), tl.sum(p, 1)


@triton.jit
def _gather_rows(kv_ptr, idx, valid, offs_d, mask_d, stride_kvr, DTYPE: tl.constexpr,
                 FP8_ROWS: tl.constexpr, NOPE: tl.constexpr, ROW_BYTES: tl.constexpr, SCALE_OFF: tl.constexpr,
                 ROW_E: tl.constexpr, ROPE_OFF_E: tl.constexpr, ROPE_DT: tl.constexpr, COMPACT: tl.constexpr,
                 ROPE_DIM: tl.constexpr, DEQUANT: tl.constexpr):
    """Rows idx [BLOCK_N] of the KV buffer as [BLOCK_N, BLOCK_D] DTYPE (0 where invalid): float rows as they are,
    FP8 KV rows (kernels/kv_rows.py) dequantized in registers (DEQUANT 0: from the code bits, 1: by the FP8
    conversion); the row stride is a constexpr there, so the compiler sees 8-byte aligned rows. The rope dims are
    read through kv_ptr cast to ROPE_DT in the kernel (a second pointer argument cost AMD 11-23 spilled SGPRs)."""
    r = idx.to(tl.int64)[:, None]
    if FP8_ROWS:
        rope_ptr = kv_ptr.to(tl.pointer_type(ROPE_DT), bitcast=True)
        if COMPACT:
            rows = _gather_fp8_compact(kv_ptr, rope_ptr, r, valid, offs_d, NOPE, ROW_BYTES, SCALE_OFF, ROW_E,
                                       ROPE_OFF_E, ROPE_DIM, DEQUANT, DTYPE)
        else:
            nope = offs_d < NOPE
            m = valid[:, None] & nope[None, :]
            code = tl.load(kv_ptr + r * ROW_BYTES + offs_d[None, :], mask=m, other=0)
            sbyte = tl.load(kv_ptr + r * ROW_BYTES + SCALE_OFF + offs_d[None, :] // 64, mask=m, other=0).to(tl.int32)
            rope = tl.load(rope_ptr + r * ROW_E + (ROPE_OFF_E - NOPE) + offs_d[None, :],
                           mask=valid[:, None] & (mask_d & ~nope)[None, :], other=0.0)
            if DEQUANT == 0:
                rows = tl.where(nope[None, :], _e4m3fn_dequant(code.to(tl.int32), sbyte), rope.to(tl.float32))
            else:
                rows = tl.where(nope[None, :], _e4m3fn_cvt(code, sbyte, DTYPE), rope.to(DTYPE))
        rows = rows.to(DTYPE)
    else:
        rows = tl.load(kv_ptr + r * stride_kvr + offs_d[None, :], mask=valid[:, None] & mask_d[None, :], other=0.0)
    return rows


@triton.jit
def _load_fp8_compact(kv_ptr, rope_ptr, r, valid, offs_d, NOPE: tl.constexpr, ROW_BYTES: tl.constexpr,
                      SCALE_OFF: tl.constexpr, ROW_E: tl.constexpr, ROPE_OFF_E: tl.constexpr, ROPE_DIM: tl.constexpr):
    """The tiles of `_gather_fp8_compact`: codes [N, BLOCK_D/64, 64] uint8 (0 past the nope dims), scale bytes
    [N, BLOCK_D/64] int32 (127, a scale of 1, for the rope chunk and past D), rope dims [N, 64] ROPE_DT."""
    BLOCK_N: tl.constexpr = r.shape[0]
    BLOCK_D: tl.constexpr = offs_d.shape[0]
    NCH: tl.constexpr = BLOCK_D // 64
    chunk = tl.arange(0, NCH)
    offs_e = tl.arange(0, 64)
    code = tl.load(kv_ptr + r * ROW_BYTES + offs_d[None, :], mask=valid[:, None] & (offs_d < NOPE)[None, :], other=0)
    word_ptr = kv_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
    word = tl.load(word_ptr + r * (ROW_BYTES // 8) + SCALE_OFF // 8, mask=valid[:, None], other=0)  # [N, 1]
    rope = tl.load(rope_ptr + r * ROW_E + ROPE_OFF_E + offs_e[None, :],
                   mask=valid[:, None] & (offs_e < ROPE_DIM)[None, :], other=0.0)
    sbyte = ((word >> (8 * chunk[None, :]).to(tl.int64)) & 0xFF).to(tl.int32)  # [N, NCH]
    sbyte = tl.where((chunk < NOPE // 64)[None, :], sbyte, 127)  # the rope chunk and past D: 2^0
    return tl.reshape(code, [BLOCK_N, NCH, 64]), sbyte, rope


@triton.jit
def _gather_fp8_compact(kv_ptr, rope_ptr, r, valid, offs_d, NOPE: tl.constexpr, ROW_BYTES: tl.constexpr,
                        SCALE_OFF: tl.constexpr, ROW_E: tl.constexpr, ROPE_OFF_E: tl.constexpr, ROPE_DIM: tl.constexpr,
                        DEQUANT: tl.constexpr, DTYPE: tl.constexpr):
    """FP8 KV rows as DTYPE [BLOCK_N, BLOCK_D] from tiles of the row's own size: codes [N, BLOCK_D] bytes, the
    scale bytes as one int64 word a row [N, 1] (split into bytes in registers), the rope dims [N, 64]; each
    pipelined load stage holds 648 bytes a key at V4's geometry instead of 2048 (codes, a scale byte per column and
    a BLOCK_D rope tile), which let 64-key steps fit an H100's shared memory (`smem_bytes`). The scales are one
    8-byte load a row so that the pipeliner can move them with cp.async (≥ 4 bytes a thread): as [N, 8] bytes at 8
    warps (1-2 bytes a thread) they were a plain load inside the loop, a dependent global round trip every key step
    (sm_90 TTGIR, 2026-12-06). Needs rope dims ≤ 64, 8-byte aligned scales (`_compact_rows`) and an 8-byte aligned
    `kv` (the wrapper checks). The rope dims fill 64-column chunk NOPE/64, placed by a broadcast over the
    [N, BLOCK_D/64, 64] view. DEQUANT 0 decodes the codes from their bits, 1 by the FP8 conversion."""
    BLOCK_N: tl.constexpr = r.shape[0]
    BLOCK_D: tl.constexpr = offs_d.shape[0]
    NCH: tl.constexpr = BLOCK_D // 64
    chunk = tl.arange(0, NCH)
    code3, sbyte, rope = _load_fp8_compact(kv_ptr, rope_ptr, r, valid, offs_d, NOPE, ROW_BYTES, SCALE_OFF, ROW_E,
                                           ROPE_OFF_E, ROPE_DIM)
    if DEQUANT == 0:
        vals = _e4m3fn_dequant(code3.to(tl.int32), sbyte[:, :, None])  # [N, NCH, 64]
        vals = tl.where((chunk == NOPE // 64)[None, :, None], rope.to(tl.float32)[:, None, :], vals)
    else:
        vals = _e4m3fn_cvt(code3, sbyte[:, :, None], DTYPE)
        vals = tl.where((chunk == NOPE // 64)[None, :, None], rope.to(DTYPE)[:, None, :], vals)
    return tl.reshape(vals, [BLOCK_N, BLOCK_D]).to(DTYPE)


@triton.jit
def _gather_fp8_chunks(kv_ptr, idx, valid, offs_d, DTYPE: tl.constexpr, NOPE: tl.constexpr,
                       ROW_BYTES: tl.constexpr, SCALE_OFF: tl.constexpr, ROW_E: tl.constexpr, ROPE_OFF_E: tl.constexpr,
                       ROPE_DT: tl.constexpr, ROPE_DIM: tl.constexpr):
    """Compact FP8 KV rows for the chunked dots (DEQUANT 2): the e4m3 values unscaled, [BLOCK_D/64, BLOCK_N, 64]
    DTYPE by the FP8 conversion (exact in bf16, fp16 and fp32), the rope dims in chunk NOPE/64, and the scales
    [BLOCK_D/64, BLOCK_N] fp32 (1 for the rope chunk): row n's value in column 64·c + e is vals[c, n, e] · scl[c, n]."""
    BLOCK_D: tl.constexpr = offs_d.shape[0]
    NCH: tl.constexpr = BLOCK_D // 64
    chunk = tl.arange(0, NCH)
    r = idx.to(tl.int64)[:, None]
    rope_ptr = kv_ptr.to(tl.pointer_type(ROPE_DT), bitcast=True)
    code3, sbyte, rope = _load_fp8_compact(kv_ptr, rope_ptr, r, valid, offs_d, NOPE, ROW_BYTES, SCALE_OFF, ROW_E,
                                           ROPE_OFF_E, ROPE_DIM)
    vals = code3.to(tl.float8e4nv, bitcast=True).to(tl.float32).to(DTYPE)  # f16x2 → f32 → DTYPE (see _e4m3fn_cvt)
    vals = tl.where((chunk == NOPE // 64)[None, :, None], rope.to(DTYPE)[:, None, :], vals)
    scl = (sbyte << 23).to(tl.float32, bitcast=True)
    return tl.permute(vals, (1, 0, 2)), tl.permute(scl, (1, 0))


@triton.jit
def _merge_block(part_o_ptr, part_lse_ptr, sink_ptr, out_ptr, lse_ptr, t, offs_h, mask_h, offs_d, mask_d,
                 H, num_splits, stride_ot, stride_oh, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                 MERGE_U: tl.constexpr):
    """`_merge_splits` for one (token, head block), inside the attention kernel (partials read through L2): one
    pass over the splits with a running maximum (online LSE merge), MERGE_U splits a load ([BLOCK_H, MERGE_U,
    BLOCK_D]), so the program waits on ⌈splits / MERGE_U⌉ round trips to L2 rather than 2 · splits (a loop over the
    splits for their maximum, then one for the sums, one split a load: the pipeliner leaves such loops alone,
    sm_90 TTGIR, 2026-12-06)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    base = (t * H + offs_h) * num_splits  # [BLOCK_H]
    offs_u = tl.arange(0, MERGE_U)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max of the partials' LSEs (log2 domain)
    total = tl.zeros([BLOCK_H], tl.float32)  # Σ 2^(lse_s − m)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)  # Σ 2^(lse_s − m) · o_s
    for sp in range(0, num_splits, MERGE_U):
        s_u = sp + offs_u  # [U]
        m_u = mask_h[:, None] & (s_u < num_splits)[None, :]  # [BLOCK_H, U]
        lse_u = tl.load(part_lse_ptr + base[:, None] + s_u[None, :], mask=m_u, other=float("-inf"),
                        cache_modifier=".cg")
        if MERGE_U == 1:
            o_u = tl.load(part_o_ptr + (base + sp)[:, None] * D + offs_d[None, :],
                          mask=m_u & mask_d[None, :], other=0.0, cache_modifier=".cg")
        else:
            o_u = tl.load(part_o_ptr + ((base[:, None] + s_u[None, :]) * D)[:, :, None] + offs_d[None, None, :],
                          mask=m_u[:, :, None] & mask_d[None, None, :], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(lse_u, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_use)  # 0 while m = −inf
        w = tl.exp2(lse_u - m_use[:, None])  # [BLOCK_H, U]
        total = total * alpha + tl.sum(w, 1)
        if MERGE_U == 1:
            acc = acc * alpha[:, None] + w * o_u
        else:
            acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o_u, 1)
        m = m_new
    mx_safe = tl.where(m == float("-inf"), 0.0, m)
    sink2 = tl.load(sink_ptr + offs_h, mask=mask_h, other=0.0) * LOG2E
    top = tl.maximum(m, sink2)
    top = tl.where(top == float("-inf"), 0.0, top)
    a = tl.exp2(mx_safe - top)
    den = total * a + tl.exp2(sink2 - top)
    o = tl.where(den[:, None] == 0.0, 0.0, acc * (a / tl.where(den == 0.0, 1.0, den))[:, None])
    tl.store(out_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=mask_h[:, None] & mask_d[None, :])
    lse2 = mx_safe + tl.log2(tl.where(total == 0.0, 1.0, total))
    tl.store(lse_ptr + t * H + offs_h, tl.where(m == float("-inf"), float("-inf"), lse2 * LN2), mask=mask_h)


@triton.jit(do_not_specialize=["num_splits"])  # one binary for split and unsplit launches
def _sparse_attn_fwd(
    q_ptr, kv_ptr, idx_ptr, sink_ptr, out_ptr, lse_ptr, part_o_ptr, part_lse_ptr, ticket_ptr,
    H, R, K, keys_per_split, num_splits,
    stride_qt, stride_qh, stride_kvr, stride_it, stride_ot, stride_oh,
    scale_log2,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    IDX_SEG: tl.constexpr, SKIP_EMPTY: tl.constexpr, IEEE_DOT: tl.constexpr,
    FP8_ROWS: tl.constexpr, NOPE: tl.constexpr, ROW_BYTES: tl.constexpr, SCALE_OFF: tl.constexpr,
    ROW_E: tl.constexpr, ROPE_OFF_E: tl.constexpr, ROPE_DT: tl.constexpr, FUSED_MERGE: tl.constexpr,
    COMPACT: tl.constexpr, MERGE_U: tl.constexpr, DEQUANT: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    sp = tl.program_id(2)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < H
    mask_d = offs_d < D
    q = tl.load(q_ptr + t * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_H, BLOCK_D]

    k_begin = sp * keys_per_split
    k_end = tl.minimum(k_begin + keys_per_split, K)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max of s·log2(e)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    # One load of the split's whole index segment finds its last valid key (trailing padding is
    # skipped) and leaves the indices in L1, so the per-step index loads below never wait on DRAM
    # (they did: 2.65 µs per 32-key step at H = 64 on H100). Each step's indices load one step
    # ahead, so the pipeliner sees the gather as a direct load: num_stages - 1 gathers in flight.
    idx_row = idx_ptr + t * stride_it
    offs_seg = k_begin + tl.arange(0, IDX_SEG)
    idx_seg = tl.load(idx_row + offs_seg, mask=offs_seg < k_end, other=-1)
    k_stop = tl.max(tl.where((idx_seg >= 0) & (idx_seg < R), offs_seg + 1, k_begin), 0)
    offs_n = k_begin + tl.arange(0, BLOCK_N)
    idx_next = tl.load(idx_row + offs_n, mask=offs_n < k_stop, other=-1)
    CHUNKS: tl.constexpr = FP8_ROWS and DEQUANT == 2
    DTYPE: tl.constexpr = q_ptr.dtype.element_ty
    if CHUNKS:
        # the scales stay out of the key tile: batched dots over the 64-column chunks (_gather_fp8_chunks)
        NCH: tl.constexpr = BLOCK_D // 64
        q3 = tl.permute(tl.reshape(q, [BLOCK_H, NCH, 64]), (1, 0, 2))  # [NCH, BLOCK_H, 64]
        acc3 = tl.zeros([NCH, BLOCK_H, 64], tl.float32)
    for start in range(k_begin, k_stop, BLOCK_N):
        idx = idx_next
        offs_n = start + BLOCK_N + tl.arange(0, BLOCK_N)
        idx_next = tl.load(idx_row + offs_n, mask=offs_n < k_stop, other=-1)
        valid = (idx >= 0) & (idx < R)
        if CHUNKS:
            vals3, scl = _gather_fp8_chunks(kv_ptr, idx, valid, offs_d, DTYPE, NOPE, ROW_BYTES, SCALE_OFF, ROW_E,
                                            ROPE_OFF_E, ROPE_DT, D - NOPE)  # [NCH, BLOCK_N, 64], [NCH, BLOCK_N]
            if IEEE_DOT:
                s3 = tl.dot(q3, tl.permute(vals3, (0, 2, 1)), input_precision="ieee")
            else:
                s3 = tl.dot(q3, tl.permute(vals3, (0, 2, 1)))  # [NCH, BLOCK_H, BLOCK_N]
            s = tl.sum(s3 * scl[:, None, :], 0)
        else:
            rows = _gather_rows(kv_ptr, idx, valid, offs_d, mask_d, stride_kvr, DTYPE,
                                FP8_ROWS, NOPE, ROW_BYTES, SCALE_OFF, ROW_E, ROPE_OFF_E, ROPE_DT, COMPACT,
                                D - NOPE, DEQUANT)  # [BLOCK_N, BLOCK_D]
            if IEEE_DOT:
                s = tl.dot(q, tl.trans(rows), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(rows))
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))  # [BLOCK_H, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        if SKIP_EMPTY:
            # A block without a valid key skips the exponentials. Being a data-dependent branch, it
            # also hides from Triton that S feeds the second dot, so S is laid over both warpgroups
            # ([4, 2] warps) instead of being computed twice ([8, 1]: 64 rows cannot fill 2 × 64).
            if tl.max(valid.to(tl.int32), 0) > 0:
                alpha, p, l_blk = _block_softmax(s, m_i, m_use, DTYPE)
            else:
                alpha = tl.full([BLOCK_H], 1.0, tl.float32)
                p = tl.zeros([BLOCK_H, BLOCK_N], DTYPE)
                l_blk = tl.zeros([BLOCK_H], tl.float32)
        else:
            alpha, p, l_blk = _block_softmax(s, m_i, m_use, DTYPE)
        l_i = l_i * alpha + l_blk
        m_i = m_new
        if CHUNKS:
            # P's columns times each chunk's scales: exact (powers of two; bf16 and fp32 hold their range)
            p3 = (p[None, :, :].to(tl.float32) * scl[:, None, :]).to(DTYPE)  # [NCH, BLOCK_H, BLOCK_N]
            if IEEE_DOT:
                pv3 = tl.dot(p3, vals3, input_precision="ieee")
            else:
                pv3 = tl.dot(p3, vals3)  # [NCH, BLOCK_H, 64]
            acc3 = acc3 * alpha[None, :, None] + pv3
        else:
            if IEEE_DOT:
                pv = tl.dot(p, rows, input_precision="ieee")
            else:
                pv = tl.dot(p, rows)
            acc = acc * alpha[:, None] + pv
    if CHUNKS:
        acc = tl.reshape(tl.permute(acc3, (1, 0, 2)), [BLOCK_H, BLOCK_D])

    empty = l_i == 0.0  # l ≥ 1 as soon as one key is valid
    l_safe = tl.where(empty, 1.0, l_i)
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
    if num_splits > 1:
        # fp32 partial normalised by its own sum; the merge kernel applies the sink once.
        row = (t * H + offs_h) * num_splits + sp
        tl.store(part_o_ptr + row[:, None] * D + offs_d[None, :], acc / l_safe[:, None],
                 mask=mask_h[:, None] & mask_d[None, :])
        tl.store(part_lse_ptr + row, lse2, mask=mask_h)
        if FUSED_MERGE:
            # The last program of this (token, head block) to finish merges every split: one launch instead of
            # two. Its ticket is an acq_rel atomic (the partials' stores before it, the loads after it), reset
            # to 0 by the merging program, so a zeroed ticket buffer stays zeroed across launches (CUDA graphs).
            tl.debug_barrier()
            ticket = ticket_ptr + t * tl.num_programs(1) + hb
            if tl.atomic_add(ticket, 1, sem="acq_rel") == num_splits - 1:
                _merge_block(part_o_ptr, part_lse_ptr, sink_ptr, out_ptr, lse_ptr, t, offs_h, mask_h, offs_d,
                             mask_d, H, num_splits, stride_ot, stride_oh, D, BLOCK_H, BLOCK_D, MERGE_U)
                tl.atomic_xchg(ticket, 0)
    else:
        sink2 = tl.load(sink_ptr + offs_h, mask=mask_h, other=0.0) * LOG2E
        top = tl.maximum(m_i, sink2)
        top = tl.where(top == float("-inf"), 0.0, top)
        a = tl.exp2(m_i - top)
        den = l_i * a + tl.exp2(sink2 - top)
        w = tl.where(den == 0.0, 0.0, a / tl.where(den == 0.0, 1.0, den))
        o = acc * w[:, None]
        tl.store(out_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=mask_h[:, None] & mask_d[None, :])
        tl.store(lse_ptr + t * H + offs_h, lse2 * LN2, mask=mask_h)


@triton.jit
def _merge_splits(
    part_o_ptr, part_lse_ptr, sink_ptr, out_ptr, lse_ptr,
    H, num_splits, stride_ot, stride_oh,
    D: tl.constexpr, BLOCK_DM: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # One program per (token, head, BLOCK_DM columns): every partial is loaded in one round trip.
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    dc = tl.program_id(2)
    base = (t * H + h) * num_splits
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = dc * BLOCK_DM + tl.arange(0, BLOCK_DM)
    mask_s = offs_s < num_splits
    lse_s = tl.load(part_lse_ptr + base + offs_s, mask=mask_s, other=float("-inf"))  # log2 domain
    o_s = tl.load(part_o_ptr + (base + offs_s)[:, None] * D + offs_d[None, :],
                  mask=mask_s[:, None] & (offs_d < D)[None, :], other=0.0)  # [BLOCK_S, BLOCK_DM]
    mx = tl.max(lse_s, 0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    sink2 = tl.load(sink_ptr + h) * LOG2E
    top = tl.maximum(mx, sink2)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(lse_s - top)
    den = tl.sum(w, 0) + tl.exp2(sink2 - top)
    acc = tl.sum(w[:, None] * o_s, 0)
    o = tl.where(den == 0.0, 0.0, acc / tl.where(den == 0.0, 1.0, den))
    tl.store(out_ptr + t * stride_ot + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty), mask=offs_d < D)
    total = tl.sum(tl.exp2(lse_s - mx_safe), 0)
    lse2 = mx_safe + tl.log2(tl.where(total == 0.0, 1.0, total))
    tl.store(lse_ptr + t * H + h, tl.where(mx == float("-inf"), float("-inf"), lse2 * LN2), mask=dc == 0)


# ----------------------------------------------------------------------------------------------------
# Checks shared by the wrappers and the references


def _check_attn_inputs(q, kv, indices, attn_sink, scale, out, lse, allowed_dtypes,
                       kv_layout: KVRowLayout | None = None) -> None:
    for name, x, dim in (("q", q, 3), ("kv", kv, 2), ("indices", indices, 2), ("attn_sink", attn_sink, 1)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != dim:
            raise ValueError(f"{name} must have {dim} dims, got shape {tuple(x.shape)}")
    T, H, D = q.shape
    if kv_layout is not None:
        if not isinstance(kv_layout, KVRowLayout) or kv_layout.head_dim != D:
            raise ValueError(f"kv_layout must be a KVRowLayout with head_dim {D} to match q {tuple(q.shape)}, "
                             f"got {kv_layout}")
        check_rows(kv, kv_layout, "kv")
    elif kv.shape[1] != D:
        raise ValueError(f"kv must be [R, {D}] to match q {tuple(q.shape)}, got {tuple(kv.shape)}")
    if indices.shape[0] != T:
        raise ValueError(f"indices must be [{T}, K] to match q {tuple(q.shape)}, got {tuple(indices.shape)}")
    if attn_sink.shape[0] != H:
        raise ValueError(f"attn_sink must be [{H}] to match q {tuple(q.shape)}, got {tuple(attn_sink.shape)}")
    if q.dtype not in allowed_dtypes or (kv_layout is None and kv.dtype != q.dtype):
        raise TypeError(f"q and kv must share a dtype among {allowed_dtypes}, got {q.dtype} and {kv.dtype}")
    if indices.dtype != torch.int32:
        raise TypeError(f"indices must be int32, got {indices.dtype}")
    if not attn_sink.dtype.is_floating_point:
        raise TypeError(f"attn_sink must be float32, got {attn_sink.dtype}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    devices = {x.device for x in (q, kv, indices, attn_sink)}
    if len(devices) != 1:
        raise ValueError(f"q, kv, indices and attn_sink must be on one device, got {sorted(map(str, devices))}")
    check_out("out", out, (T, H, D), q.dtype, q.device)
    check_out("lse", lse, (T, H), lse_dtype(q.dtype), q.device)


def _check_triton_layout(q, kv, indices, attn_sink, out, lse) -> None:
    D, K = q.shape[2], indices.shape[1]
    if not 16 <= D <= _MAX_TRITON_D:
        raise ValueError(f"the Triton path supports 16 <= D <= {_MAX_TRITON_D}, got D={D}")
    if K > _MAX_KEYS_PER_SPLIT * _MAX_SPLITS:
        raise ValueError(f"the Triton path supports K <= {_MAX_KEYS_PER_SPLIT * _MAX_SPLITS}, got K={K}")
    if attn_sink.dtype != torch.float32:
        raise TypeError(f"attn_sink must be float32, got {attn_sink.dtype}")
    for name, x in (("q", q), ("kv", kv), ("indices", indices), ("out", out)):
        if x is not None and x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {x.stride()}")
    for name, x in (("attn_sink", attn_sink), ("lse", lse)):
        if x is not None and not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {x.stride()}")


# ----------------------------------------------------------------------------------------------------
# sparse_attn


def sparse_attn(
    q: torch.Tensor,  # [T, H, D]
    kv: torch.Tensor,  # [R, D]
    indices: torch.Tensor,  # [T, K] int32, < 0 = padding
    attn_sink: torch.Tensor,  # [H] fp32
    scale: float,
    out: torch.Tensor | None = None,  # [T, H, D], q.dtype
    lse: torch.Tensor | None = None,  # [T, H] fp32
    *,
    kv_layout: KVRowLayout | None = None,  # kv is FP8 KV rows [R, row_bytes] uint8 in this layout
    backend: Backend = "auto",
    config: SparseAttnConfig | None = None,
    tickets: torch.Tensor | None = None,  # int32 [≥ T·⌈H/block_h⌉], zero: fused_merge's tickets, left zero
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MQA attention with a sink (module docstring). Returns (out [T, H, D] q.dtype, lse [T, H] fp32)."""
    _check_attn_inputs(q, kv, indices, attn_sink, scale, out, lse, _SUPPORTED_DTYPES, kv_layout)
    if pick_backend(backend, q, kv, indices, attn_sink) == "reference":
        return sparse_attn_ref(q, kv, indices, attn_sink, scale, out, lse, kv_layout=kv_layout)
    _check_triton_layout(q, kv, indices, attn_sink, out, lse)
    if _compact_rows(kv_layout) and kv.data_ptr() % 8:
        raise ValueError(f"FP8 KV rows must start at an 8-byte aligned address (their scale words are read as int64), "
                         f"got kv.data_ptr() = {kv.data_ptr():#x}")
    T, H, D = q.shape
    R, K = kv.shape[0], indices.shape[1]
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty((T, H), dtype=torch.float32, device=q.device) if lse is None else lse
    if T == 0:
        return out, lse
    if config is None:
        props = torch.cuda.get_device_properties(q.device) if q.is_cuda else None
        config = default_config(T, H, K, D, props.multi_processor_count if props else 1, amd_arch(q.device),
                                fp8_rows=kv_layout is not None, kv_layout=kv_layout,
                                smem_limit=getattr(props, "shared_memory_per_block_optin", SM90_SMEM_BYTES))
    _check_config(config)
    if kv_layout is not None and config.dequant == "cvt_chunks":
        if not _compact_rows(kv_layout):
            raise ValueError(f"dequant='cvt_chunks' needs compact FP8 KV rows (rope dims ≤ 64), got {kv_layout}")
        if q.dtype == torch.float16:
            raise ValueError("dequant='cvt_chunks' needs q in bf16 or fp32 (P times the scales can leave fp16's range)")
    # A split's index segment is loaded at once (≤ 2048 keys); at most 64 splits to merge.
    num_splits = min(max(config.num_splits, triton.cdiv(K, _MAX_KEYS_PER_SPLIT)), _MAX_SPLITS)
    keys_per_split = triton.cdiv(triton.cdiv(max(K, 1), num_splits), config.block_n) * config.block_n
    num_splits = triton.cdiv(max(K, 1), keys_per_split)
    split = num_splits > 1
    part_o = part_lse = tickets_arg = lse
    fused = split and config.fused_merge
    if fused:
        need = T * triton.cdiv(H, config.block_h)
        if tickets is None:
            tickets = torch.zeros(need, dtype=torch.int32, device=q.device)
        elif tickets.dtype != torch.int32 or tickets.device != q.device or tickets.numel() < need:
            raise ValueError(f"tickets must be int32 with ≥ {need} elements on {q.device}, got {tickets.dtype} "
                             f"{tuple(tickets.shape)} on {tickets.device}")
        tickets_arg = tickets
    if split:
        part_o = torch.empty((T, H, num_splits, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((T, H, num_splits), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(D))
    grid = (T, triton.cdiv(H, config.block_h), num_splits)
    rows_args = kv_layout.launch_args() if kv_layout else dict(NOPE=0, ROW_BYTES=0, SCALE_OFF=0, ROW_E=0,
                                                               ROPE_OFF_E=0)
    _sparse_attn_fwd[grid](
        q, kv, indices, attn_sink, out, lse, part_o, part_lse, tickets_arg,
        H, R, K, keys_per_split, num_splits,
        q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), out.stride(0), out.stride(1),
        float(scale) * _LOG2E,
        D=D, BLOCK_D=block_d, BLOCK_H=config.block_h, BLOCK_N=config.block_n,
        IDX_SEG=256 if keys_per_split <= 256 else _MAX_KEYS_PER_SPLIT, SKIP_EMPTY=config.skip_empty,
        IEEE_DOT=q.dtype == torch.float32, FP8_ROWS=kv_layout is not None, **rows_args,
        ROPE_DT=_TL_DTYPES[kv_layout.rope_dtype] if kv_layout else tl.bfloat16, FUSED_MERGE=fused,
        COMPACT=_compact_rows(kv_layout), MERGE_U=_merge_unroll(config, block_d) if fused else 1,
        DEQUANT=DEQUANT_MODES.index(config.dequant) if kv_layout else 0,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if split and not fused:
        block_dm = min(block_d, 128)
        _merge_splits[(T, H, triton.cdiv(D, block_dm))](
            part_o, part_lse, attn_sink, out, lse, H, num_splits, out.stride(0), out.stride(1),
            D=D, BLOCK_DM=block_dm, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), num_warps=4,
        )
    return out, lse


def _merge_unroll(config: SparseAttnConfig, block_d: int) -> int:
    """Splits a fused merge loads at once: as many as keep its [block_h, U, block_d] fp32 tile at ≤ 32 values a
    thread, at most 8 (1 at V4's D = 512 tiles: 2 spilled 48 bytes at h16/w8 on sm_90)."""
    u = 32 * 32 * config.num_warps // (config.block_h * block_d)
    return min(8, 1 << max(0, u.bit_length() - 1)) if u >= 1 else 1


def _compact_rows(kv_layout: KVRowLayout | None) -> bool:
    """FP8 KV rows the compact gather reads (`_gather_fp8_compact`): rope dims in one 64-column chunk and the
    scale bytes at an 8-byte boundary (V4: 64 rope dims, scales at byte 576). Other layouts take the wide gather."""
    return kv_layout is not None and kv_layout.rope_dim <= 64 and kv_layout.scale_offset % 8 == 0


def _check_config(config: SparseAttnConfig) -> None:
    for name in ("block_h", "block_n"):
        v = getattr(config, name)
        if not 16 <= v <= 256 or v & (v - 1):
            raise ValueError(f"config.{name} must be a power of two in [16, 256] (tl.dot tiles), got {v}")
    if config.num_splits < 1 or config.num_warps < 1 or config.num_stages < 1:
        raise ValueError(f"config.num_splits, num_warps and num_stages must be >= 1, got {config}")
    if config.dequant not in DEQUANT_MODES:
        raise ValueError(f"config.dequant must be one of {DEQUANT_MODES}, got {config.dequant!r}")


def sparse_attn_ref(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    attn_sink: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    *,
    kv_layout: KVRowLayout | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: gather (FP8 KV rows dequantized), masked softmax with the sink, in fp32 (fp64 for fp64
    inputs)."""
    _check_attn_inputs(q, kv, indices, attn_sink, scale, out, lse, _SUPPORTED_DTYPES + (torch.float64,), kv_layout)
    T, H, D = q.shape
    R, K = kv.shape[0], indices.shape[1]
    if not (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        if K and T and int(indices.max()) >= R:
            raise ValueError(f"indices must be < R={R} (or < 0 for padding), got max {int(indices.max())}")
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    o_all = torch.empty((T, H, D), dtype=ct, device=q.device)
    lse_all = torch.empty((T, H), dtype=ct, device=q.device)
    sink = attn_sink.to(ct)[None, :, None]  # [1, H, 1]
    chunk = max(1, (1 << 26) // max(1, K * D))  # gathered rows per chunk ≤ 64M elements
    for t0 in range(0, T, chunk):
        idx = indices[t0:t0 + chunk].long()
        valid = (idx >= 0)[:, None, :]  # [t, 1, K]
        rows = kv[idx.clamp(min=0)]  # [t, K, D], or [t, K, row_bytes] FP8 KV rows
        rows = (unpack_kv_rows(rows, kv_layout) if kv_layout is not None else rows).to(ct)
        s = torch.einsum("thd,tkd->thk", q[t0:t0 + chunk].to(ct), rows) * scale
        s = s.masked_fill(~valid, float("-inf"))
        s_max = s.amax(-1, keepdim=True) if K else s.new_full((*s.shape[:2], 1), float("-inf"))
        top = torch.maximum(s_max, sink)
        top = top.masked_fill(top == float("-inf"), 0.0)
        e = torch.exp(s - top)
        den = e.sum(-1, keepdim=True) + torch.exp(sink - top)
        o = torch.einsum("thk,tkd->thd", e, rows) / den
        o_all[t0:t0 + chunk] = torch.where(den == 0, 0.0, o)
        m = s_max.masked_fill(s_max == float("-inf"), 0.0)
        lse_all[t0:t0 + chunk] = (m + torch.exp(s - m).sum(-1, keepdim=True).log()).squeeze(-1)
    out = o_all.to(q.dtype) if out is None else out.copy_(o_all)
    lse = lse_all.to(lse_dtype(q.dtype)) if lse is None else lse.copy_(lse_all)
    return out, lse
