"""The lightning indexer's FP8 key cache, its scores and its top-k selection (docs/dsv4-spec.md "Indexer").

Cache row (docs/DESIGN.md §6): 128 FP8 e4m3 values, one fp32 scale at byte 128, zero padding to 144 bytes; the
cache is uint8 [pages, rows_per_page, 144] and flat slot s = page · rows_per_page + offset is row s.
Quantization, one scale per row of 128 values (indexer keys, and queries per (token, head)):

    scale = max(amax, 1e-4) / FP8_MAX       (ue8m0: rounded up to a power of two)
    x_fp8 = rne(clamp(x / scale, ±FP8_MAX)),    dequant = x_fp8 · scale

FP8_MAX = 448 for e4m3fn (H100, MI355X); 240 for e4m3fnuz (MI300), whose cache bytes differ accordingly.
Scores and selection for token t of request b = seq_ids[t], over the entries e < visible[t] of that request,
whose row is page_table[b, e // R] · R + e % R:

    score[t, e] = Σ_h relu((q8[t,h] · k8_e) · q_scale[t,h] · scale_e) · weights[t,h]
    indices[t]  = top-k positions e by score (topk.py: −1 padded, descending score, ties lower e first)

Kernels: `_quantize_rows` quantizes BLOCK_R rows a program and writes them to cache slots or dense outputs;
the FP8 encoding is done on the bits (round to nearest even, exact on every platform: the interpreter's own
fp32→fp8 cast mis-rounds at binade edges). `_score_kernel` runs one program per (group of `tokens` tokens,
chunk of entries): it holds q [tokens·Hi, 128] and the per-head factor q_scale·weights (relu(x·a) =
relu(x)·a for a > 0), gathers BLOCK_E cache rows a step through the page table (pipelined, num_stages
deep), and computes scale_e · Σ_h relu(k8_e · q8[t,h]) · (q_scale·w)[t,h] with an FP8 tl.dot (fp16 where
FP8 MMA is missing; fp8 → fp16 is exact). Decode uses one token a program; prefill groups 8 tokens of one
request so that each key tile read from L2 serves 512 query rows (a group mixing requests falls back to
one token at a time). Only [T, E] scores are written (−inf past visible[t]), never [T, Hi, E]; then
`topk_visible` selects. The launch depends on shapes only (no host sync): a decode step with a fixed
page-table width replays under a CUDA graph.

References (`*_ref`, also the CPU path): exact and batch-invariant. q8·k8 products of two e4m3 values are
multiples of 2^−18 below 2^18, so a 128-term dot in fp64 is exact in any summation order; the scales,
relu, weights and the head sum follow elementwise in fp64 in a fixed order, rounded once to fp32. A token's
scores therefore do not depend on the batch, on how many entries its request has, or on the device.
Portability: plain Triton; the dot tile is [BLOCK_E ≥ 16, BLOCK_H ≥ 16] (AMD MFMA needs ≥ 16).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import triton
import triton.language as tl

from sparsepd.kernels.device import Backend, amd_arch, fp8_e4m3_dtype, pick_backend
from sparsepd.kernels.topk import Order, TopkConfig, topk_visible, topk_visible_ref

ScaleFmt = Literal["ue8m0", "float"]

HEAD_DIM = 128  # values a row
ROW_BYTES = 144  # 128 FP8 + fp32 scale + 12 bytes of padding (16-byte aligned rows)
SCALE_OFFSET = 128  # byte offset of the scale in a row
AMAX_FLOOR = 1e-4  # amax floor: scale > 0 for an all-zero row (the model's fp8_round_trip uses the same)
_ROW_F32 = ROW_BYTES // 4
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
_FLOAT_INPUTS = (torch.bfloat16, torch.float16, torch.float32)


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of this FP8 flavour: 448 (e4m3fn), 240 (e4m3fnuz)."""
    return float(torch.finfo(dtype).max)


# ----------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _encode_e4m3(y, EXP_BIAS: tl.constexpr, NO_NEG_ZERO: tl.constexpr):
    """fp32 → e4m3 bits (int32 in [0, 255]), round to nearest even, for |y| ≤ the format's max."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    exp = mag >> 23
    # normal: keep 3 mantissa bits (a carry moves into the exponent), rebias the exponent
    normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - ((127 - EXP_BIAS) << 3)
    # subnormal: m · 2^(−EXP_BIAS−2), m = rne(mantissa24 >> shift)
    mant = (mag & 0x7FFFFF) | 0x800000
    shift = tl.minimum(148 - EXP_BIAS - exp, 25)
    q = mant >> shift
    rem = mant & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    sub = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
    code = tl.where(exp < 128 - EXP_BIAS, sub, normal)
    if NO_NEG_ZERO:
        sign = tl.where(code == 0, 0, sign)
    return sign | code


@triton.jit
def _quantize_rows(
    x_ptr, dst_ptr, dst_f32_ptr, slots_ptr, n_rows, n_slots, x_stride, dst_row_bytes, scale_stride, scale_offset,
    FP8_MAX: tl.constexpr, UE8M0: tl.constexpr, EXP_BIAS: tl.constexpr, NO_NEG_ZERO: tl.constexpr,
    HAS_SLOTS: tl.constexpr, PAD: tl.constexpr, BLOCK_R: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, 128)
    live = r < n_rows
    x = tl.load(x_ptr + r[:, None].to(tl.int64) * x_stride + d[None, :], mask=live[:, None], other=0.0)
    x = x.to(tl.float32)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4), FP8_MAX)  # [BLOCK_R]
    if UE8M0:  # round up to a power of two on the bits (scale is a normal number here)
        sb = scale.to(tl.int32, bitcast=True)
        sb = (sb & 0x7F800000) + tl.where((sb & 0x7FFFFF) != 0, 0x800000, 0)
        scale = sb.to(tl.float32, bitcast=True)
    y = tl.math.div_rn(x, scale[:, None])
    y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
    code = _encode_e4m3(y, EXP_BIAS, NO_NEG_ZERO).to(tl.uint8)
    if HAS_SLOTS:
        dst = tl.load(slots_ptr + r, mask=live, other=-1)
        live = live & (dst >= 0) & (dst < n_slots)
    else:
        dst = r.to(tl.int64)
    tl.store(dst_ptr + dst[:, None] * dst_row_bytes + d[None, :], code, mask=live[:, None])
    tl.store(dst_f32_ptr + dst * scale_stride + scale_offset, scale, mask=live)
    if PAD:
        p = tl.arange(0, 16)
        tl.store(dst_ptr + dst[:, None] * dst_row_bytes + (132 + p[None, :]), tl.zeros([BLOCK_R, 16], tl.uint8),
                 mask=live[:, None] & (p[None, :] < 12))


@triton.jit
def _load_queries(q_ptr, q_scale_ptr, w_ptr, t_first, T, H,
                  NT: tl.constexpr, BLOCK_H: tl.constexpr, FNUZ: tl.constexpr, DOT_FP8: tl.constexpr):
    """Rows (token, head) of NT tokens from t_first: q^T [128, NT·BLOCK_H] for the dot, q_scale·w [NT·BLOCK_H]."""
    r = tl.arange(0, NT * BLOCK_H)
    h = r % BLOCK_H
    t = t_first + r // BLOCK_H
    ok = (h < H) & (t < T)
    off = t.to(tl.int64) * H + h
    q = tl.load(q_ptr + off[:, None] * 128 + tl.arange(0, 128)[None, :], mask=ok[:, None], other=0)
    head_w = tl.load(q_scale_ptr + off, mask=ok, other=0.0) * tl.load(w_ptr + off, mask=ok, other=0.0)
    q = q.to(tl.float8e4b8, bitcast=True) if FNUZ else q.to(tl.float8e4nv, bitcast=True)
    if not DOT_FP8:
        q = q.to(tl.float16)
    return tl.trans(q), head_w


@triton.jit
def _gather_keys(cache_ptr, cache_f32_ptr, page_row, e, m, rows_per_page,
                 FNUZ: tl.constexpr, DOT_FP8: tl.constexpr):
    """Cache rows of entries e through the request's page-table row: FP8 tile [BLOCK_E, 128], scales."""
    page = tl.load(page_row + e // rows_per_page, mask=m, other=0)
    row = page.to(tl.int64) * rows_per_page + e % rows_per_page
    kb = tl.load(cache_ptr + row[:, None] * 144 + tl.arange(0, 128)[None, :], mask=m[:, None], other=0)
    k_scale = tl.load(cache_f32_ptr + row * 36 + 32, mask=m, other=0.0)
    kb = kb.to(tl.float8e4b8, bitcast=True) if FNUZ else kb.to(tl.float8e4nv, bitcast=True)
    if not DOT_FP8:
        kb = kb.to(tl.float16)
    return kb, k_scale


@triton.jit
def _score_tokens(
    q_ptr, q_scale_ptr, w_ptr, cache_ptr, cache_f32_ptr, page_table_ptr, seq_ids_ptr, visible_ptr, scores_ptr,
    t_first, e_begin, e_end, T, H, n_entries, pt_stride, rows_per_page,
    NT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr, FNUZ: tl.constexpr, DOT_FP8: tl.constexpr,
):
    """Scores of entries [e_begin, e_end) for NT tokens from t_first that share one request: each gathered
    key tile serves all NT · Hi query rows in one dot."""
    tt = t_first + tl.arange(0, NT)
    t_ok = tt < T
    n_vis = tl.minimum(tl.maximum(tl.load(visible_ptr + tt, mask=t_ok, other=0), 0), n_entries)  # [NT]
    vis_end = tl.minimum(e_end, tl.max(n_vis))
    offs_e = tl.arange(0, BLOCK_E)
    score_rows = scores_ptr + tt.to(tl.int64)[None, :] * n_entries  # [1, NT]
    if e_begin < vis_end:
        q_t, head_w = _load_queries(q_ptr, q_scale_ptr, w_ptr, t_first, T, H, NT, BLOCK_H, FNUZ, DOT_FP8)
        page_row = page_table_ptr + tl.load(seq_ids_ptr + t_first).to(tl.int64) * pt_stride
        for e0 in range(e_begin, vis_end, BLOCK_E):
            e = e0 + offs_e
            m = e < vis_end
            kb, k_scale = _gather_keys(cache_ptr, cache_f32_ptr, page_row, e, m, rows_per_page, FNUZ, DOT_FP8)
            x = tl.maximum(tl.dot(kb, q_t), 0.0) * head_w[None, :]  # [BLOCK_E, NT·BLOCK_H]
            if NT == 1:
                s = tl.sum(x, axis=1)[:, None]  # heads along the row: reduced within a warp
            else:
                s = tl.sum(tl.reshape(x, [BLOCK_E, NT, BLOCK_H]), axis=2)
            s = tl.where(e[:, None] < n_vis[None, :], s * k_scale[:, None], float("-inf"))  # [BLOCK_E, NT]
            tl.store(score_rows + e[:, None], s, mask=(e[:, None] < e_end) & t_ok[None, :])
    # entries past every token's visible count (the partial block above already holds −inf)
    fill = e_begin + tl.cdiv(tl.maximum(vis_end - e_begin, 0), BLOCK_E) * BLOCK_E
    for e0 in range(fill, e_end, BLOCK_E):
        e = e0 + offs_e
        tl.store(score_rows + e[:, None], tl.full([BLOCK_E, NT], float("-inf"), tl.float32),
                 mask=(e[:, None] < e_end) & t_ok[None, :])


@triton.jit
def _score_kernel(
    q_ptr, q_scale_ptr, w_ptr, cache_ptr, cache_f32_ptr, page_table_ptr, seq_ids_ptr, visible_ptr, scores_ptr,
    T, H, n_entries, entries_per_prog, pt_stride, rows_per_page,
    TOKENS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr, FNUZ: tl.constexpr, DOT_FP8: tl.constexpr,
):
    e_begin = tl.program_id(0) * entries_per_prog
    e_end = tl.minimum(e_begin + entries_per_prog, n_entries)
    t0 = tl.program_id(1) * TOKENS
    if TOKENS == 1:
        _score_tokens(q_ptr, q_scale_ptr, w_ptr, cache_ptr, cache_f32_ptr, page_table_ptr, seq_ids_ptr, visible_ptr,
                      scores_ptr, t0, e_begin, e_end, T, H, n_entries, pt_stride, rows_per_page,
                      1, BLOCK_H, BLOCK_E, FNUZ, DOT_FP8)
    else:
        tt = t0 + tl.arange(0, TOKENS)
        seq = tl.load(seq_ids_ptr + tt, mask=tt < T, other=-1)
        shared = tl.sum(((seq == tl.load(seq_ids_ptr + t0)) | (tt >= T)).to(tl.int32)) == TOKENS
        if shared:  # one request (prefill): one key tile for all TOKENS tokens
            _score_tokens(q_ptr, q_scale_ptr, w_ptr, cache_ptr, cache_f32_ptr, page_table_ptr, seq_ids_ptr,
                          visible_ptr, scores_ptr, t0, e_begin, e_end, T, H, n_entries, pt_stride, rows_per_page,
                          TOKENS, BLOCK_H, BLOCK_E, FNUZ, DOT_FP8)
        else:
            for i in tl.static_range(TOKENS):
                if t0 + i < T:
                    _score_tokens(q_ptr, q_scale_ptr, w_ptr, cache_ptr, cache_f32_ptr, page_table_ptr, seq_ids_ptr,
                                  visible_ptr, scores_ptr, t0 + i, e_begin, e_end, T, H, n_entries, pt_stride,
                                  rows_per_page, 1, BLOCK_H, BLOCK_E, FNUZ, DOT_FP8)


# ----------------------------------------------------------------------------------------------------
# Quantization and the cache


def _fp8_params(dtype: torch.dtype) -> dict:
    fnuz = dtype == torch.float8_e4m3fnuz
    return {"FP8_MAX": fp8_max(dtype), "EXP_BIAS": 8 if fnuz else 7, "NO_NEG_ZERO": fnuz}


def _check_scale_fmt(scale_fmt: str) -> None:
    if scale_fmt not in ("ue8m0", "float"):
        raise ValueError(f"scale_fmt must be 'ue8m0' or 'float', got {scale_fmt!r}")


def _check_rows(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != HEAD_DIM:
        raise ValueError(f"{name} must be a [..., {HEAD_DIM}] tensor, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in _FLOAT_INPUTS:
        raise TypeError(f"{name} must be bf16, fp16 or fp32, got {x.dtype}")


def _launch_quantize(x2: torch.Tensor, dst: torch.Tensor, dst_f32: torch.Tensor, slots: torch.Tensor | None,
                     n_slots: int, dst_row_bytes: int, scale_stride: int, scale_offset: int,
                     scale_fmt: str, fp8_dtype: torch.dtype, pad: bool) -> None:
    n = x2.shape[0]
    if n == 0:
        return
    block_r = 16
    _quantize_rows[(triton.cdiv(n, block_r),)](
        x2, dst, dst_f32, x2 if slots is None else slots, n, n_slots, x2.stride(0), dst_row_bytes,
        scale_stride, scale_offset, UE8M0=scale_fmt == "ue8m0", HAS_SLOTS=slots is not None, PAD=pad,
        BLOCK_R=block_r, num_warps=4, **_fp8_params(fp8_dtype),
    )


def quantize_rows_fp8(
    x: torch.Tensor, scale_fmt: ScaleFmt = "ue8m0", *, backend: Backend = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row FP8 quantization of x [..., 128] (module doc): (x_fp8 [..., 128], scale [...] fp32)."""
    _check_rows("x", x)
    _check_scale_fmt(scale_fmt)
    if pick_backend(backend, x) == "reference":
        return quantize_rows_fp8_ref(x, scale_fmt)
    fp8 = fp8_e4m3_dtype(x.device)
    x2 = x.reshape(-1, HEAD_DIM)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.uint8, device=x.device)  # [N, 128]
    scale = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)  # [N]
    _launch_quantize(x2, out, scale, None, x2.shape[0], HEAD_DIM, 1, 0, scale_fmt, fp8, pad=False)
    return out.view(fp8).view(x.shape), scale.view(x.shape[:-1])


def quantize_rows_fp8_ref(x: torch.Tensor, scale_fmt: ScaleFmt = "ue8m0") -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch quantization (module doc); equal bytes to the kernel's."""
    _check_rows("x", x)
    _check_scale_fmt(scale_fmt)
    fp8 = fp8_e4m3_dtype(x.device)
    top = fp8_max(fp8)
    xf = x.float()
    scale = xf.abs().amax(-1).clamp_min(AMAX_FLOOR) / top  # [...]
    if scale_fmt == "ue8m0":
        mantissa, exponent = torch.frexp(scale)
        scale = torch.ldexp(torch.ones_like(scale), torch.where(mantissa == 0.5, exponent - 1, exponent))
    x8 = (xf / scale[..., None]).clamp(-top, top).to(fp8)
    return x8, scale


def dequantize_rows_fp8(x_fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x_fp8 [..., 128] · scale [...] → fp32 [..., 128] (exact: an e4m3 value times a power of two, or one
    rounding for float scales). One elementwise op: no kernel needed."""
    if x_fp8.dtype not in _FP8_DTYPES or x_fp8.shape[:-1] != scale.shape:
        raise ValueError(f"need x_fp8 [..., {HEAD_DIM}] FP8 and scale [...], got {x_fp8.dtype} "
                         f"{tuple(x_fp8.shape)} and {tuple(scale.shape)}")
    return x_fp8.float() * scale.float()[..., None]


def _check_cache(cache: torch.Tensor) -> None:
    if not isinstance(cache, torch.Tensor) or cache.dim() != 3 or cache.shape[2] != ROW_BYTES:
        raise ValueError(f"cache must be [pages, rows_per_page, {ROW_BYTES}], got {getattr(cache, 'shape', cache)}")
    if cache.dtype != torch.uint8:
        raise TypeError(f"cache must be uint8, got {cache.dtype}")
    if not cache.is_contiguous():
        raise ValueError(f"cache must be contiguous, got strides {cache.stride()}")


def _check_slots(slots: torch.Tensor, n: int, device: torch.device) -> None:
    if not isinstance(slots, torch.Tensor) or slots.shape != (n,) or slots.dtype != torch.int64:
        raise ValueError(f"slots must be int64 [{n}], got {getattr(slots, 'dtype', type(slots))} "
                         f"{tuple(getattr(slots, 'shape', ()))}")
    if slots.device != device:
        raise ValueError(f"slots are on {slots.device}, expected {device}")


def _host_checks_allowed(t: torch.Tensor) -> bool:
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def indexer_cache_write(
    cache: torch.Tensor,  # [pages, rows_per_page, 144] uint8, written in place
    k: torch.Tensor,  # [N, 128] bf16/fp16/fp32
    slots: torch.Tensor,  # [N] int64 flat slots, −1 = skip
    scale_fmt: ScaleFmt = "ue8m0",
    *,
    backend: Backend = "auto",
) -> None:
    """Quantize each row of k and write it, its scale and zero padding at cache row slots[n].

    Slots ≥ pages·rows_per_page: the reference raises, the kernel skips them (never writes out of bounds).
    """
    _check_cache(cache)
    _check_rows("k", k)
    _check_scale_fmt(scale_fmt)
    if k.dim() != 2:
        raise ValueError(f"k must be [N, {HEAD_DIM}], got {tuple(k.shape)}")
    _check_slots(slots, k.shape[0], cache.device)
    if k.device != cache.device:
        raise ValueError(f"k is on {k.device}, cache on {cache.device}")
    if pick_backend(backend, cache, k, slots) == "reference":
        return indexer_cache_write_ref(cache, k, slots, scale_fmt)
    k2 = k if k.stride(1) == 1 else k.contiguous()
    _launch_quantize(k2, cache, cache.view(torch.float32), slots, cache.shape[0] * cache.shape[1], ROW_BYTES,
                     _ROW_F32, SCALE_OFFSET // 4, scale_fmt, fp8_e4m3_dtype(cache.device), pad=True)


def indexer_cache_write_ref(cache: torch.Tensor, k: torch.Tensor, slots: torch.Tensor,
                            scale_fmt: ScaleFmt = "ue8m0") -> None:
    """Plain PyTorch cache write: quantize_rows_fp8_ref, then byte rows scattered at the slots."""
    _check_cache(cache)
    _check_rows("k", k)
    _check_slots(slots, k.shape[0], cache.device)
    n_slots = cache.shape[0] * cache.shape[1]
    if _host_checks_allowed(slots) and slots.numel() and int(slots.max()) >= n_slots:
        raise ValueError(f"slots must be < pages·rows_per_page = {n_slots} (or −1), got max {int(slots.max())}")
    k8, scale = quantize_rows_fp8_ref(k, scale_fmt)
    rows = torch.zeros((k.shape[0], ROW_BYTES), dtype=torch.uint8, device=cache.device)  # [N, 144]
    rows[:, :SCALE_OFFSET] = k8.view(torch.uint8)
    rows[:, SCALE_OFFSET:SCALE_OFFSET + 4] = scale[:, None].view(torch.uint8)
    keep = slots >= 0
    cache.view(-1, ROW_BYTES).index_copy_(0, slots[keep], rows[keep])


def indexer_cache_read(cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows at flat slots [N] (int64, each in [0, pages·rows_per_page)): (k_fp8 [N, 128], scale [N] fp32).

    A plain gather (torch indexing is already one copy at memory speed), the same on every device.
    """
    _check_cache(cache)
    if not isinstance(slots, torch.Tensor) or slots.dim() != 1:
        raise ValueError(f"slots must be a 1-D int64 tensor, got {getattr(slots, 'shape', type(slots))}")
    _check_slots(slots, slots.shape[0], cache.device)
    n_slots = cache.shape[0] * cache.shape[1]
    if _host_checks_allowed(slots) and slots.numel() and not bool(((slots >= 0) & (slots < n_slots)).all()):
        raise ValueError(f"slots must be in [0, {n_slots}), got min {int(slots.min())} max {int(slots.max())}")
    rows = cache.view(-1, ROW_BYTES)[slots]  # [N, 144]
    k8 = rows[:, :SCALE_OFFSET].contiguous().view(fp8_e4m3_dtype(cache.device))
    scale = rows[:, SCALE_OFFSET:SCALE_OFFSET + 4].contiguous().view(torch.float32).view(-1)
    return k8, scale


# ----------------------------------------------------------------------------------------------------
# Scores and top-k


def _check_index_inputs(q, q_scale, weights, cache, page_table, seq_ids, visible) -> None:
    _check_cache(cache)
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.shape[2] != HEAD_DIM:
        raise ValueError(f"q must be [T, Hi, {HEAD_DIM}], got {getattr(q, 'shape', type(q))}")
    T, H, _ = q.shape
    if q.dtype in _FP8_DTYPES:
        if q.dtype != fp8_e4m3_dtype(q.device):
            raise TypeError(f"q is {q.dtype}; this device's FP8 cache format is {fp8_e4m3_dtype(q.device)}")
        if not isinstance(q_scale, torch.Tensor) or q_scale.shape != (T, H) or q_scale.dtype != torch.float32:
            raise ValueError(f"FP8 q needs q_scale fp32 [{T}, {H}], got {getattr(q_scale, 'dtype', q_scale)} "
                             f"{tuple(getattr(q_scale, 'shape', ()))}")
    elif q.dtype in _FLOAT_INPUTS:
        if q_scale is not None:
            raise ValueError(f"q_scale must be None for {q.dtype} q (it is quantized inside)")
    else:
        raise TypeError(f"q must be FP8 e4m3 (with q_scale) or bf16/fp16/fp32, got {q.dtype}")
    if not isinstance(weights, torch.Tensor) or weights.shape != (T, H) or weights.dtype != torch.float32:
        raise ValueError(f"weights must be fp32 [{T}, {H}], got {getattr(weights, 'dtype', weights)} "
                         f"{tuple(getattr(weights, 'shape', ()))}")
    if not isinstance(page_table, torch.Tensor) or page_table.dim() != 2 or page_table.dtype != torch.int32:
        raise ValueError(f"page_table must be int32 [B, max_pages], got {getattr(page_table, 'dtype', page_table)}"
                         f" {tuple(getattr(page_table, 'shape', ()))}")
    for name, x in (("seq_ids", seq_ids), ("visible", visible)):
        if not isinstance(x, torch.Tensor) or x.shape != (T,) or x.dtype != torch.int32:
            raise ValueError(f"{name} must be int32 [{T}], got {getattr(x, 'dtype', x)} "
                             f"{tuple(getattr(x, 'shape', ()))}")
    for name, x in (("q_scale", q_scale), ("weights", weights), ("cache", cache), ("page_table", page_table),
                    ("seq_ids", seq_ids), ("visible", visible)):
        if x is not None and x.device != q.device:
            raise ValueError(f"{name} is on {x.device}, q on {q.device}")


@dataclass(frozen=True, slots=True)
class ScoreConfig:
    """Launch parameters of `_score_kernel` (the default comes from `default_score_config`)."""

    block_e: int  # cache rows gathered a step: the dot's M, ≥ 16, a power of two
    num_warps: int
    num_stages: int  # software-pipelining depth of the gathers
    tokens: int = 1  # tokens a program (one request's): each key tile serves all of them
    programs_per_sm: int = 4  # entry chunks per token are sized for about this many programs an SM


def default_score_config(n_tokens: int, n_entries: int, num_sms: int, arch: str | None = None) -> ScoreConfig:
    """Decode: 64 rows (9 KiB of cache) a step, 3 stages, ~4 programs an SM: 22.3 µs vs 25.7 µs for 128 rows,
    35.3 µs for 32 (B = 32, 8192 entries, H100). Prefill (many tokens of one request): 8 tokens a program,
    so each key tile read from L2 serves 512 query rows: 890 µs vs 1296 µs one token a program (T = 4096,
    8192 entries). Shared memory ≤ 3 · 8 KiB + 64 KiB (fits MI355X's 160 KiB LDS). On gfx950 (`arch`, MI355X)
    prefill takes 4 tokens a program: at 8 the 8-warp program spills ~105 VGPRs to scratch (a wave gets 256),
    at 4 it needs 191 (tests/kernels/test_amd_compile.py; compile-checked, not timed)."""
    block_e = 64 if n_entries >= 64 else max(16, triton.next_power_of_2(n_entries))
    if n_tokens >= 8 * num_sms:
        return ScoreConfig(block_e, 8, 3, tokens=4 if arch == "gfx950" else 8)
    return ScoreConfig(block_e, 4, 3)


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _fp8_dot_supported(device: torch.device) -> bool:
    """FP8 MMA: NVIDIA sm_89+, AMD gfx942 (fnuz) and gfx950 (OCP). Elsewhere (and in the interpreter) the
    FP8 tiles are widened to fp16, exactly."""
    if device.type != "cuda":
        return False
    if torch.version.hip:
        arch = torch.cuda.get_device_properties(device).gcnArchName
        return arch.startswith(("gfx942", "gfx950"))
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _check_scores_out(out: torch.Tensor | None, T: int, E: int, device: torch.device) -> None:
    if out is None:
        return
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (T, E) or out.dtype != torch.float32:
        raise ValueError(f"out must be fp32 [{T}, {E}], got {getattr(out, 'dtype', out)} "
                         f"{list(getattr(out, 'shape', ()))}")
    if out.device != device or not out.is_contiguous():
        raise ValueError(f"out must be contiguous on {device}, got {out.device}, strides {out.stride()}")


def indexer_scores(
    q: torch.Tensor,  # [T, Hi, 128] FP8 (with q_scale) or bf16/fp16/fp32
    q_scale: torch.Tensor | None,  # [T, Hi] fp32
    weights: torch.Tensor,  # [T, Hi] fp32
    cache: torch.Tensor,  # [pages, R, 144] uint8
    page_table: torch.Tensor,  # [B, max_pages] int32
    seq_ids: torch.Tensor,  # [T] int32
    visible: torch.Tensor,  # [T] int32
    *,
    scale_fmt: ScaleFmt = "ue8m0",
    out: torch.Tensor | None = None,  # [T, max_pages · R] fp32
    backend: Backend = "auto",
    config: ScoreConfig | None = None,
) -> torch.Tensor:
    """Scores [T, max_pages · R] fp32 (module doc), −inf at e ≥ visible[t]. scale_fmt quantizes a float q."""
    _check_index_inputs(q, q_scale, weights, cache, page_table, seq_ids, visible)
    _check_scale_fmt(scale_fmt)
    _check_scores_out(out, q.shape[0], page_table.shape[1] * cache.shape[1], q.device)
    if pick_backend(backend, q, weights, cache, page_table, seq_ids, visible) == "reference":
        res = indexer_scores_ref(q, q_scale, weights, cache, page_table, seq_ids, visible, scale_fmt=scale_fmt)
        return res if out is None else out.copy_(res)
    if q.dtype not in _FP8_DTYPES:
        q, q_scale = quantize_rows_fp8(q, scale_fmt, backend="triton")
    if page_table.stride(1) != 1:
        raise ValueError(f"page_table must have unit last stride, got strides {page_table.stride()}")
    T, H, _ = q.shape
    R = cache.shape[1]
    E = page_table.shape[1] * R
    scores = torch.empty((T, E), dtype=torch.float32, device=q.device) if out is None else out
    if T == 0 or E == 0:
        return scores
    q, q_scale, weights = q.contiguous(), q_scale.contiguous(), weights.contiguous()
    num_sms = _num_sms(q.device)
    config = default_score_config(T, E, num_sms, amd_arch(q.device)) if config is None else config
    if config.block_e < 16 or config.block_e & (config.block_e - 1) or config.tokens not in (1, 2, 4, 8):
        raise ValueError(f"config.block_e must be a power of two >= 16 and tokens 1, 2, 4 or 8, got {config}")
    groups = triton.cdiv(T, config.tokens)
    chunks = triton.cdiv(config.programs_per_sm * num_sms, groups)
    per_prog = max(config.block_e, triton.cdiv(triton.cdiv(E, chunks), config.block_e) * config.block_e)
    _score_kernel[(triton.cdiv(E, per_prog), groups)](
        q.view(torch.uint8), q_scale, weights, cache, cache.view(torch.float32), page_table, seq_ids, visible,
        scores, T, H, E, per_prog, page_table.stride(0), R,  # R at run time: any page size, one compile
        TOKENS=config.tokens, BLOCK_H=max(16, triton.next_power_of_2(H)), BLOCK_E=config.block_e,
        FNUZ=q.dtype == torch.float8_e4m3fnuz, DOT_FP8=_fp8_dot_supported(q.device),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return scores


def indexer_scores_ref(q, q_scale, weights, cache, page_table, seq_ids, visible, *,
                       scale_fmt: ScaleFmt = "ue8m0") -> torch.Tensor:
    """Plain PyTorch scores, exact fp64 dots (module doc), rounded once to fp32; −inf at e ≥ visible[t]."""
    _check_index_inputs(q, q_scale, weights, cache, page_table, seq_ids, visible)
    if q.dtype not in _FP8_DTYPES:
        q, q_scale = quantize_rows_fp8_ref(q, scale_fmt)
    T, H, _ = q.shape
    R = cache.shape[1]
    E = page_table.shape[1] * R
    scores = torch.full((T, E), float("-inf"), dtype=torch.float32, device=q.device)
    n_vis = visible.long().clamp(0, E)
    q64, qs64, w64 = q.double(), q_scale.double(), weights.double()
    for b in torch.unique(seq_ids).tolist():
        tok = (seq_ids == b).nonzero().flatten()  # [Tb]
        n = int(n_vis[tok].max())
        if n == 0:
            continue
        e = torch.arange(n, device=q.device)
        rows = page_table[b].long()[e // R] * R + e % R  # [n]
        k8, k_scale = indexer_cache_read(cache, rows)
        k64, ks64 = k8.double(), k_scale.double()
        acc = torch.zeros((tok.numel(), n), dtype=torch.float64, device=q.device)  # [Tb, n]
        for h in range(H):
            dots = q64[tok, h] @ k64.T  # exact
            acc += torch.relu(dots * qs64[tok, h, None] * ks64[None, :]) * w64[tok, h, None]
        acc = acc.float().masked_fill(e[None, :] >= n_vis[tok, None], float("-inf"))
        scores[tok, :n] = acc
    return scores


def indexer_topk(
    q: torch.Tensor,  # [T, Hi, 128] FP8 (with q_scale) or bf16/fp16/fp32
    q_scale: torch.Tensor | None,  # [T, Hi] fp32
    weights: torch.Tensor,  # [T, Hi] fp32
    cache: torch.Tensor,  # [pages, R, 144] uint8
    page_table: torch.Tensor,  # [B, max_pages] int32
    seq_ids: torch.Tensor,  # [T] int32: the request (page-table row) of each token
    visible: torch.Tensor,  # [T] int32: entries token t may see
    k: int,
    *,
    scale_fmt: ScaleFmt = "ue8m0",
    order: Order = "score",
    out: torch.Tensor | None = None,  # [T, k] int32
    backend: Backend = "auto",
    score_config: ScoreConfig | None = None,
    topk_config: TopkConfig | None = None,
) -> torch.Tensor:
    """Positions (within each request's compressed sequence) of each token's k best entries: int32 [T, k],
    −1 padded when visible[t] < k; order="score" (default): descending score, ties lower position first."""
    scores = indexer_scores(q, q_scale, weights, cache, page_table, seq_ids, visible, scale_fmt=scale_fmt,
                            backend=backend, config=score_config)
    return topk_visible(scores, visible, k, order=order, out=out, backend=backend, config=topk_config)


def indexer_topk_ref(q, q_scale, weights, cache, page_table, seq_ids, visible, k, *,
                     scale_fmt: ScaleFmt = "ue8m0", order: Order = "score") -> torch.Tensor:
    """indexer_scores_ref then topk_visible_ref: deterministic and batch-invariant."""
    scores = indexer_scores_ref(q, q_scale, weights, cache, page_table, seq_ids, visible, scale_fmt=scale_fmt)
    return topk_visible_ref(scores, visible, k, order=order)
