"""The fused compressor: one launch per layer commits every entry of a ragged batch into the paged cache.

docs/dsv4-spec.md "Compressor"; plans from kernels/compress_plan.py. For each compress-plan row
(r, b, p, window_len), entry e = (p + 1) // ratio − 1 pools the W = coff·ratio window positions
q = p − W + 1 … p (coff = 2 with overlap, else 1): padding rows first (q < 0: kv 0, score −inf), then
window_len rows from the request's ring (`kv_state`/`score_state[slot_ids[b], q % W]`, scores already
biased), then rows of this forward's input (row r − (p − q); score + ape[q % ratio]). With overlap, rows
of the previous block use channels [0, d), rows of this block channels [d, 2d).

    pooled[c] = Σ_w softmax_w(score[w, c]) · kv[w, c]                                   (fp32)
    x         = pooled rounded to act_dtype
    y         = x · rsqrt(mean(x²) + eps) · norm_weight                                  (fp32, → act_dtype)
    y[-rd:]   = RoPE(y[-rd:]) at position e·ratio, GPT-J pairs, tables cos/sin [max_pos, rd/2]  (→ act_dtype)
    main:     y[:d−rd] = FP8 e4m3 round trip in blocks of 64, scale = 2^ceil(log2(max(amax, 1e-4)/448))
              (if fp8_nope); row page_table[b, e // R]·R + e % R of cache [pages, R, d] = y (cache dtype),
              or with row_layout that row of the uint8 cache [pages, R, row_bytes] holds y as an FP8 KV row
              (kernels/kv_rows.py: the codes and scales of this rounding, the rope dims in rope_dtype)
    indexer:  z = y · H_128/√128 (Sylvester order), one FP8 cache row of kernels/indexer.py's format
              (128 e4m3 values, fp32 scale at byte 128, zero padding to 144; scale = amax/FP8_MAX, ue8m0:
              rounded up to a power of two); same row addressing in the uint8 cache [pages, R, 144]

The compressor reads the rings before the same forward's ring writes (kernels/state_update.py).

API (all tensors on one device; `backend` as in kernels/device.py):
    compress_main(kv, score, ape, kv_state, score_state, slot_ids, plan, norm_weight, cos, sin, cache,
                  page_table, *, eps, act_dtype, fp8_nope=True, row_layout=None, backend="auto", config=None)
    compress_indexer(kv, score, ape, kv_state, score_state, slot_ids, plan, norm_weight, cos, sin, cache,
                     page_table, *, eps, act_dtype, scale_fmt="ue8m0", backend="auto", config=None) -> None
    compress_main_ref / compress_indexer_ref: same signatures (without backend/config), plain PyTorch.
kv, score [N, coff·d] fp32 (score without ape); ape [ratio, coff·d] fp32; kv_state, score_state
[num_slots, W, coff·d] fp32; slot_ids [B] int; plan: a CompressPlan (its commit rows; −1 rows skipped);
norm_weight [d]; cos, sin [max_pos, rd/2] fp32 (rd = rope dims); page_table [B, max_pages] int32;
act_dtype bf16/fp16/fp32; main cache bf16/fp16/fp32 or uint8 FP8 KV rows, indexer cache uint8 (d = 128).
Rows whose page is outside page_table's width or the cache are skipped; positions must lie in the tables
(e·ratio < max_pos: not checked on the device, to keep the launch free of host syncs).

Kernel: BLOCK_M plan rows a program (1 by default), the window BLOCK_W rows at a time with an online softmax
per channel (one pass over the projected rows), then norm, RoPE (pairs split in registers), and the FP8
round trip, or the Hadamard product as an in-register fast Walsh–Hadamard transform (7 butterfly stages,
fp32 sums) and the row quantization, all before the one store. No tl.dot, so no MFMA tile-size limits on
AMD. With `window_splits` > 1 (HCA decode by default: `window_splits`) the window is split over that many
programs, each storing its softmax state (max, sum, weighted sum per channel, fp32) to a scratch buffer; the
last of them to take the entry block's ticket merges the states and finishes the entry (one launch).
The e4m3 rounding is integer arithmetic on the fp32 bits: exact on every platform and in the
interpreter.

References (`*_ref`, also the CPU path): the model's arithmetic (softmax in fp64 rounded to fp32, products
and window sums in fp32, fp32 norm and RoPE, the Hadamard product as an fp32 GEMM of at least 32 rows);
each entry's result depends only on its own window.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sparsepd.kernels.compress_plan import CompressPlan
from sparsepd.kernels.device import Backend, fp8_e4m3_dtype, pick_backend
from sparsepd.kernels.indexer import ROW_BYTES, indexer_cache_write_ref
from sparsepd.kernels.kv_rows import (
    KVRowLayout,
    _e4m3_code,
    _e4m3_round,
    _pow2_scale,
    _store_fp8_row,
    check_rows,
    pack_kv_rows_ref,
)

FP8_BLOCK = 64  # nope dims are round-tripped in blocks of 64 values
FP8_MAIN_MAX = 448.0  # the main KV round trip is e4m3fn on every platform (it models training, not storage)
AMAX_FLOOR = 1e-4
INDEX_DIM = 128
MIN_GEMM_ROWS = 32  # the model's batch-invariant fp32 GEMM pads to this many rows on the CPU
_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@dataclass(frozen=True, slots=True)
class CompressConfig:
    block_m: int  # plan rows a program
    block_w: int  # window rows a step
    num_warps: int
    window_splits: int = 1  # programs a window is split over; > 1: the last to finish (atomic ticket) merges


def window_splits(ratio: int, plan_rows: int, num_sms: int) -> int:
    """HCA decode (a 128-row window, a few commits in a fixed-capacity plan): the window split over 8 programs, each
    16 rows, merged by the last (one launch), instead of one program streaming 512 KB in 16 dependent steps
    (17.1 µs for 128 requests on H100, bench/RESULTS.md "Kernels III"). Not timed yet: bench/bench_compressor.py
    times both. Prefill (plan rows ≥ the SMs) keeps one program an entry."""
    return 8 if ratio >= 64 and plan_rows < num_sms else 1


def default_config(d: int, window: int, indexer: bool) -> CompressConfig:
    """The launch table: one entry a program; warps tile the channels (4 values a thread, so the window
    reduction stays in registers: warps across window rows cost up to 3× in the H100 sweep); windows 8 rows
    a step (HCA at 8 rows: 53.5 µs prefill / 16.0 µs decode vs 54.6 / 18.9 at 16 rows, H100)."""
    warps = max(1, triton.next_power_of_2(d) // 128)
    return CompressConfig(1, min(window, 8), warps)


# ----------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _hadamard_stage(z, BLOCK_M: tl.constexpr, A: tl.constexpr, BK: tl.constexpr):
    """One butterfly stage over bit log2(BK) of the 128 channels: index i = a·2·BK + t·BK + c pairs t = 0, 1."""
    t = tl.permute(tl.reshape(z, [BLOCK_M, A, 2, BK]), (0, 1, 3, 2))  # [M, A, BK, 2]
    u, v = tl.split(t)
    t = tl.permute(tl.join(u + v, u - v), (0, 1, 3, 2))
    return tl.reshape(t, [BLOCK_M, 2 * A * BK])


@triton.jit
def _merge_window_splits(part_ptr, ticket_ptr, m, c, m_run, l_run, acc, SPLITS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store this split's softmax state (max, sum, weighted sum per channel); the last program of the entry block
    to take the ticket (acq_rel: the stores before it, the loads after) merges every split's state and resets the
    ticket to 0, so a zeroed ticket buffer stays zeroed. Returns the merged state and whether this program merged."""
    base = (m.to(tl.int64)[:, None] * SPLITS + tl.program_id(1)) * (3 * BLOCK_D) + c[None, :]
    tl.store(part_ptr + base, m_run)
    tl.store(part_ptr + base + BLOCK_D, l_run)
    tl.store(part_ptr + base + 2 * BLOCK_D, acc)
    tl.debug_barrier()
    ticket = ticket_ptr + tl.program_id(0)
    last = tl.atomic_add(ticket, 1, sem="acq_rel") == SPLITS - 1
    lm = (tl.zeros([1, BLOCK_D], tl.int32) + last.to(tl.int32)) != 0  # [1, BLOCK_D]: off unless this one merges
    mx = tl.full([BLOCK_M, BLOCK_D], float("-inf"), tl.float32)
    tot = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    wsum = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for sp in range(SPLITS):
        at = (m.to(tl.int64)[:, None] * SPLITS + sp) * (3 * BLOCK_D) + c[None, :]
        m_s = tl.load(part_ptr + at, mask=lm, other=float("-inf"), cache_modifier=".cg")
        l_s = tl.load(part_ptr + at + BLOCK_D, mask=lm, other=0.0, cache_modifier=".cg")
        a_s = tl.load(part_ptr + at + 2 * BLOCK_D, mask=lm, other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(mx, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        old, new = tl.exp(mx - m_safe), tl.exp(m_s - m_safe)
        tot = tot * old + l_s * new
        wsum = wsum * old + a_s * new
        mx = m_new
    if last:
        tl.atomic_xchg(ticket, 0)
    return mx, tot, wsum, last


@triton.jit
def _compress_kernel(
    kv_ptr, score_ptr, ape_ptr, kv_state_ptr, score_state_ptr, slot_ptr, plan_ptr, norm_w_ptr, cos_ptr, sin_ptr,
    out_ptr, out_alt_ptr, page_table_ptr, part_ptr, ticket_ptr,
    n_plan, n_pages, pt_stride, pt_width, rows_per_page, max_pos, eps,
    D: tl.constexpr, ROPE: tl.constexpr, RATIO: tl.constexpr, COFF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, ACT: tl.constexpr,
    INDEXER: tl.constexpr, FP8_NOPE: tl.constexpr,
    FP8_MAX: tl.constexpr, UE8M0: tl.constexpr, EXP_BIAS: tl.constexpr, SUB_STEP: tl.constexpr,
    NO_NEG_ZERO: tl.constexpr, FP8_ROWS: tl.constexpr, NOPE: tl.constexpr, ROW_BYTES: tl.constexpr,
    SCALE_OFF: tl.constexpr, ROW_E: tl.constexpr, ROPE_OFF_E: tl.constexpr, SPLITS: tl.constexpr,
):
    # out_alt_ptr: the indexer cache as fp32 (its scale), or the FP8 KV rows as rope_dtype (their rope dims)
    W: tl.constexpr = COFF * RATIO
    C: tl.constexpr = COFF * D  # floats a projected row
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row = plan_ptr + m.to(tl.int64) * 4
    in_plan = m < n_plan
    ragged = tl.load(row, mask=in_plan, other=-1)
    live = ragged >= 0
    b = tl.load(row + 1, mask=live, other=0)
    p = tl.load(row + 2, mask=live, other=0)
    window_len = tl.load(row + 3, mask=live, other=0)
    slot = tl.load(slot_ptr + b, mask=live, other=0).to(tl.int64)
    first_input = tl.maximum(W - 1 - p, 0) + window_len  # window rows before it: padding, then ring

    c = tl.arange(0, BLOCK_D)
    c_ok = c < D
    m_run = tl.full([BLOCK_M, BLOCK_D], float("-inf"), tl.float32)
    l_run = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    WS: tl.constexpr = W // SPLITS  # window rows of this program
    split = tl.program_id(1)
    for w0 in range(split * WS, split * WS + WS, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        q = p[:, None] - (W - 1) + w[None, :]  # [M, BW] positions
        from_input = (w[None, :] >= first_input[:, None]) & live[:, None]
        from_ring = (q >= 0) & (~from_input) & live[:, None]
        in_off = (ragged[:, None] - (W - 1) + w[None, :]).to(tl.int64) * C
        ring_off = (slot[:, None] * W + (q % W)) * C
        col = ((w // RATIO) * D)[None, :, None] + c[None, None, :]  # [1, BW, BD]: overlap halves
        c3 = c_ok[None, None, :]
        mi = from_input[:, :, None] & c3
        mr = from_ring[:, :, None] & c3
        src_kv = tl.where(mi, kv_ptr + in_off[:, :, None], kv_state_ptr + ring_off[:, :, None]) + col
        src_sc = tl.where(mi, score_ptr + in_off[:, :, None], score_state_ptr + ring_off[:, :, None]) + col
        kv = tl.load(src_kv, mask=mi | mr, other=0.0)
        sc = tl.load(src_sc, mask=mi | mr, other=float("-inf"))
        bias = tl.load(ape_ptr + ((q % RATIO) * C)[:, :, None] + col, mask=mi, other=0.0)
        sc = sc + bias
        m_new = tl.maximum(m_run, tl.max(sc, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_run - m_safe)
        e = tl.exp(sc - m_safe[:, None, :])
        l_run = l_run * alpha + tl.sum(e, axis=1)
        acc = acc * alpha + tl.sum(e * kv, axis=1)
        m_run = m_new
    if SPLITS > 1:
        m_run, l_run, acc, last = _merge_window_splits(part_ptr, ticket_ptr, m, c, m_run, l_run, acc, SPLITS,
                                                       BLOCK_M, BLOCK_D)
        live = live & ((ragged * 0 + last.to(tl.int32)) != 0)  # only the merging program finishes the entry
    pooled = tl.where(c_ok[None, :] & (l_run > 0), acc / tl.where(l_run > 0, l_run, 1.0), 0.0)

    # RMSNorm in fp32 on the act_dtype-rounded row
    x = pooled.to(ACT).to(tl.float32)
    inv_rms = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    nw = tl.load(norm_w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    y = (x * inv_rms[:, None] * nw[None, :]).to(ACT).to(tl.float32)

    # RoPE at e·ratio on the last ROPE dims: pairs (y[2j], y[2j+1]), pair j ≥ (D − ROPE)/2
    HALF: tl.constexpr = BLOCK_D // 2
    ev, od = tl.split(tl.reshape(y, [BLOCK_M, HALF, 2]))
    j = tl.arange(0, HALF) - (D - ROPE) // 2
    rope_pos = p - (RATIO - 1)
    mr2 = (live & (rope_pos < max_pos))[:, None] & ((j >= 0) & (j < ROPE // 2))[None, :]
    tab = rope_pos.to(tl.int64)[:, None] * (ROPE // 2) + j[None, :]
    cs = tl.load(cos_ptr + tab, mask=mr2, other=1.0)
    sn = tl.load(sin_ptr + tab, mask=mr2, other=0.0)
    ev, od = ev * cs - od * sn, ev * sn + od * cs
    y = tl.reshape(tl.join(ev, od), [BLOCK_M, BLOCK_D]).to(ACT).to(tl.float32)

    # destination row: page_table[b, e // R] · R + e % R
    ent = (p + 1) // RATIO - 1
    pi = ent // rows_per_page
    page = tl.load(page_table_ptr + b.to(tl.int64) * pt_stride + pi, mask=live & (pi < pt_width), other=-1)
    ok = live & (page >= 0) & (page < n_pages)
    dst = page.to(tl.int64) * rows_per_page + ent % rows_per_page

    if INDEXER:
        # z = y · H_128 by the fast Walsh–Hadamard transform: 7 butterfly stages (a, b) → (a + b, a − b) on
        # index pairs differing in one bit, in registers (fp32 sums; no tl.dot, so no MFMA tile limits)
        z = _hadamard_stage(y, BLOCK_M, 64, 1)
        z = _hadamard_stage(z, BLOCK_M, 32, 2)
        z = _hadamard_stage(z, BLOCK_M, 16, 4)
        z = _hadamard_stage(z, BLOCK_M, 8, 8)
        z = _hadamard_stage(z, BLOCK_M, 4, 16)
        z = _hadamard_stage(z, BLOCK_M, 2, 32)
        z = _hadamard_stage(z, BLOCK_M, 1, 64)
        z = z * 0.08838834764831845  # 128^-0.5
        scale = _pow2_scale(tl.max(tl.abs(z), axis=1), FP8_MAX, UE8M0)
        v = tl.math.div_rn(z, scale[:, None])
        v = tl.minimum(tl.maximum(v, -FP8_MAX), FP8_MAX)
        code = _e4m3_code(_e4m3_round(v, EXP_BIAS, SUB_STEP), EXP_BIAS, SUB_STEP, NO_NEG_ZERO).to(tl.uint8)
        ROW: tl.constexpr = 144
        tl.store(out_ptr + dst[:, None] * ROW + c[None, :], code, mask=ok[:, None])
        tl.store(out_alt_ptr + dst * (ROW // 4) + 32, scale, mask=ok)
        pad = tl.arange(0, 16)
        tl.store(out_ptr + dst[:, None] * ROW + (132 + pad[None, :]), tl.zeros([BLOCK_M, 16], tl.uint8),
                 mask=ok[:, None] & (pad[None, :] < 12))
    elif FP8_ROWS:  # kernels/kv_rows.py: e4m3fn codes + ue8m0 scales for the nope dims, rope dims as they are
        _store_fp8_row(out_ptr, out_alt_ptr, dst, ok, y, c, D, BLOCK_M, BLOCK_D, NOPE, ROW_BYTES, SCALE_OFF, ROW_E,
                       ROPE_OFF_E)
    else:
        if FP8_NOPE:
            NB: tl.constexpr = BLOCK_D // 64
            g = tl.reshape(y, [BLOCK_M, NB, 64])
            scale = _pow2_scale(tl.max(tl.abs(g), axis=2), 448.0, True)  # [M, NB]
            v = tl.math.div_rn(g, scale[:, :, None])
            v = tl.minimum(tl.maximum(v, -448.0), 448.0)
            rt = _e4m3_round(v, 7, 0.001953125) * scale[:, :, None]  # e4m3fn: 2^-9
            nope = tl.arange(0, NB) < (D - ROPE) // 64
            y = tl.reshape(tl.where(nope[None, :, None], rt, g), [BLOCK_M, BLOCK_D])
        tl.store(out_ptr + dst[:, None] * D + c[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=ok[:, None] & c_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# checks and launch


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check(kv, score, ape, kv_state, score_state, slot_ids, plan, norm_weight, cos, sin, cache, page_table,
           d: int, act_dtype) -> None:
    _need(isinstance(plan, CompressPlan), f"plan must be a CompressPlan, got {type(plan).__name__}")
    coff, ratio, W = (2 if plan.overlap else 1), plan.ratio, plan.state_size
    width = coff * d
    tensors = dict(kv=kv, score=score, ape=ape, kv_state=kv_state, score_state=score_state, slot_ids=slot_ids,
                   plan_rows=plan.commit.rows, norm_weight=norm_weight, cos=cos, sin=sin, cache=cache,
                   page_table=page_table)
    for name, t in tensors.items():
        _need(isinstance(t, torch.Tensor), f"{name} must be a tensor, got {type(t).__name__}")
        _need(t.device == kv.device, f"{name} is on {t.device}, expected {kv.device} (kv's device)")
        _need(t.is_contiguous(), f"{name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")
    for name in ("kv", "score", "ape", "kv_state", "score_state", "cos", "sin"):
        _need(tensors[name].dtype == torch.float32, f"{name} must be float32, got {tensors[name].dtype}")
    _need(kv.dim() == 2 and kv.shape[1] == width,
          f"kv must be [N, {width}] (coff={coff} · d={d}), got {tuple(kv.shape)}")
    _need(score.shape == kv.shape, f"score must match kv {tuple(kv.shape)}, got {tuple(score.shape)}")
    _need(ape.shape == (ratio, width), f"ape must be [{ratio}, {width}], got {tuple(ape.shape)}")
    _need(kv_state.dim() == 3 and kv_state.shape[1:] == (W, width),
          f"kv_state must be [num_slots, {W}, {width}], got {tuple(kv_state.shape)}")
    _need(score_state.shape == kv_state.shape,
          f"score_state must match kv_state {tuple(kv_state.shape)}, got {tuple(score_state.shape)}")
    _need(slot_ids.dim() == 1 and slot_ids.dtype in (torch.int32, torch.int64),
          f"slot_ids must be a 1-D int32/int64 tensor, got {slot_ids.dtype} {tuple(slot_ids.shape)}")
    _need(page_table.dim() == 2 and page_table.dtype == torch.int32 and page_table.shape[0] == slot_ids.shape[0],
          f"page_table must be int32 [B={slot_ids.shape[0]}, max_pages], got {page_table.dtype} "
          f"{tuple(page_table.shape)}")
    _need(plan.commit.rows.dtype == torch.int32 and plan.commit.rows.dim() == 2 and plan.commit.rows.shape[1] == 4,
          f"plan rows must be int32 [R, 4], got {plan.commit.rows.dtype} {tuple(plan.commit.rows.shape)}")
    _need(norm_weight.shape == (d,) and norm_weight.dtype in _ACT_DTYPES,
          f"norm_weight must be a float [{d}] tensor, got {norm_weight.dtype} {tuple(norm_weight.shape)}")
    _need(cos.dim() == 2 and sin.shape == cos.shape and 0 < 2 * cos.shape[1] <= d,
          f"cos and sin must be [max_pos, rope_dim/2] with rope_dim ≤ {d}, got {tuple(cos.shape)}, {tuple(sin.shape)}")
    _need(act_dtype in _ACT_DTYPES, f"act_dtype must be bf16, fp16 or fp32, got {act_dtype}")


def _launch(kv, score, ape, kv_state, score_state, slot_ids, plan, norm_weight, cos, sin, out, page_table,
            d: int, eps: float, act_dtype, indexer: bool, fp8_nope: bool, scale_fmt: str,
            config: CompressConfig | None, row_layout: KVRowLayout | None = None) -> None:
    rows = plan.commit.rows
    if rows.shape[0] == 0:
        return
    cfg = config or default_config(d, plan.state_size, indexer)
    if config is None and not indexer:
        sms = torch.cuda.get_device_properties(kv.device).multi_processor_count if kv.is_cuda else 132
        cfg = dataclasses.replace(cfg, window_splits=window_splits(plan.ratio, rows.shape[0], sms))
    splits = cfg.window_splits
    W = plan.state_size
    _need(splits >= 1 and W % splits == 0 and (W // splits) % cfg.block_w == 0,
          f"config.window_splits={splits} must split the {W}-row window into multiples of block_w={cfg.block_w}")
    fp8 = fp8_e4m3_dtype(kv.device)
    fnuz = fp8 == torch.float8_e4m3fnuz
    block_d = max(triton.next_power_of_2(d), 64)
    out_alt = out.view(torch.float32) if indexer else row_layout.rope_view(out) if row_layout else out
    rows_args = row_layout.launch_args() if row_layout else dict(NOPE=0, ROW_BYTES=0, SCALE_OFF=0, ROW_E=0,
                                                                 ROPE_OFF_E=0)
    programs = triton.cdiv(rows.shape[0], cfg.block_m)
    part = tickets = kv
    if splits > 1:  # per split: max, sum, weighted sum [block_d] a plan row; tickets zeroed, left zeroed
        part = torch.empty(programs * cfg.block_m * splits * 3 * block_d, dtype=torch.float32, device=kv.device)
        tickets = torch.zeros(programs, dtype=torch.int32, device=kv.device)
    _compress_kernel[(programs, splits)](
        kv, score, ape, kv_state, score_state, slot_ids, rows, norm_weight, cos, sin, out, out_alt, page_table,
        part, tickets,
        rows.shape[0], out.shape[0], page_table.stride(0), page_table.shape[1], out.shape[1], cos.shape[0], eps,
        D=d, ROPE=2 * cos.shape[1], RATIO=plan.ratio, COFF=2 if plan.overlap else 1,
        BLOCK_M=cfg.block_m, BLOCK_W=cfg.block_w, BLOCK_D=block_d, ACT=_TL_DTYPES[act_dtype],
        INDEXER=indexer, FP8_NOPE=fp8_nope, FP8_MAX=float(torch.finfo(fp8).max), UE8M0=scale_fmt == "ue8m0",
        EXP_BIAS=8 if fnuz else 7, SUB_STEP=2.0 ** (-10 if fnuz else -9), NO_NEG_ZERO=fnuz,
        FP8_ROWS=row_layout is not None, **rows_args, SPLITS=splits, num_warps=cfg.num_warps,
    )


def compress_main(kv, score, ape, kv_state, score_state, slot_ids, plan: CompressPlan, norm_weight, cos, sin,
                  cache, page_table, *, eps: float, act_dtype: torch.dtype, fp8_nope: bool = True,
                  row_layout: KVRowLayout | None = None, backend: Backend = "auto",
                  config: CompressConfig | None = None) -> None:
    """Commit the plan's entries of a CSA/HCA main compressor into `cache` (module docstring): float rows
    [pages, R, d], or with `row_layout` FP8 KV rows [pages, R, row_bytes] uint8 (kernels/kv_rows.py)."""
    if row_layout is not None:
        check_rows(cache, row_layout, "cache")
        _need(cache.dim() == 3 and fp8_nope, f"FP8 KV rows need fp8_nope and a [pages, rows_per_page, "
                                             f"{row_layout.row_bytes}] cache, got {tuple(cache.shape)}")
        d = row_layout.head_dim
    else:
        _need(isinstance(cache, torch.Tensor) and cache.dim() == 3 and cache.dtype in _ACT_DTYPES,
              f"cache must be a bf16/fp16/fp32 [pages, rows_per_page, d] tensor, got "
              f"{getattr(cache, 'dtype', type(cache))} {tuple(getattr(cache, 'shape', ()))}")
        d = cache.shape[2]
    _check(kv, score, ape, kv_state, score_state, slot_ids, plan, norm_weight, cos, sin, cache, page_table, d,
           act_dtype)
    rope = 2 * cos.shape[1]
    _need(not fp8_nope or (d - rope) % FP8_BLOCK == 0,
          f"nope dims d − rope_dim = {d - rope} must be a multiple of {FP8_BLOCK} for the FP8 round trip")
    _need(row_layout is None or row_layout.rope_dim == rope,
          f"row_layout has {getattr(row_layout, 'rope_dim', None)} rope dims, cos/sin {rope}")
    if pick_backend(backend, kv, cache) == "reference":
        return compress_main_ref(kv, score, ape, kv_state, score_state, slot_ids, plan, norm_weight, cos, sin,
                                 cache, page_table, eps=eps, act_dtype=act_dtype, fp8_nope=fp8_nope,
                                 row_layout=row_layout)
    _launch(kv, score, ape, kv_state, score_state, slot_ids, plan, norm_weight, cos, sin, cache, page_table,
            d, eps, act_dtype, False, fp8_nope, "ue8m0", config, row_layout)


def compress_indexer(kv, score, ape, kv_state, score_state, slot_ids, plan: CompressPlan, norm_weight, cos, sin,
                     cache, page_table, *, eps: float, act_dtype: torch.dtype, scale_fmt: str = "ue8m0",
                     backend: Backend = "auto", config: CompressConfig | None = None) -> None:
    """Commit the plan's indexer keys (Hadamard-rotated, FP8 rows) into `cache` [pages, R, 144] uint8."""
    _need(isinstance(cache, torch.Tensor) and cache.dim() == 3 and cache.dtype == torch.uint8
          and cache.shape[2] == ROW_BYTES,
          f"cache must be uint8 [pages, rows_per_page, {ROW_BYTES}], got "
          f"{getattr(cache, 'dtype', type(cache))} {tuple(getattr(cache, 'shape', ()))}")
    _need(scale_fmt in ("ue8m0", "float"), f"scale_fmt must be 'ue8m0' or 'float', got {scale_fmt!r}")
    _check(kv, score, ape, kv_state, score_state, slot_ids, plan, norm_weight, cos, sin, cache, page_table,
           INDEX_DIM, act_dtype)
    if pick_backend(backend, kv, cache) == "reference":
        return compress_indexer_ref(kv, score, ape, kv_state, score_state, slot_ids, plan, norm_weight, cos, sin,
                                    cache, page_table, eps=eps, act_dtype=act_dtype, scale_fmt=scale_fmt)
    _launch(kv, score, ape, kv_state, score_state, slot_ids, plan, norm_weight, cos, sin, cache, page_table,
            INDEX_DIM, eps, act_dtype, True, False, scale_fmt, config)


# ----------------------------------------------------------------------------------------------------
# references


def pool_windows_ref(kv, score, ape, kv_state, score_state, slot_ids, plan: CompressPlan, d: int):
    """(pooled [R, d] fp32, live plan rows [R, 4] int64) for the plan's real rows (−1 rows dropped)."""
    rows = plan.commit.rows.long()
    rows = rows[rows[:, 0] >= 0]
    ratio, W = plan.ratio, plan.state_size
    r, b, p, window_len = rows.unbind(1)
    w = torch.arange(W, device=kv.device)
    q = p[:, None] - (W - 1) + w  # [R, W]
    from_input = w >= ((W - 1 - p).clamp(min=0) + window_len)[:, None]
    from_ring = (q >= 0) & ~from_input
    in_row = (r[:, None] - (W - 1) + w).clamp(min=0, max=max(kv.shape[0] - 1, 0))
    slot = slot_ids.long()[b][:, None].expand_as(q)
    ring_q = q % W
    biased = score[in_row] + ape[q % ratio]  # [R, W, coff·d]
    win_kv = torch.where(from_input[..., None], kv[in_row],
                         torch.where(from_ring[..., None], kv_state[slot, ring_q], 0.0))
    win_sc = torch.where(from_input[..., None], biased,
                         torch.where(from_ring[..., None], score_state[slot, ring_q], float("-inf")))
    half = (w // ratio)[None, :, None] * d + torch.arange(d, device=kv.device)  # overlap: previous block [0, d)
    win_kv = win_kv.gather(2, half.expand(rows.shape[0], W, d))
    win_sc = win_sc.gather(2, half.expand(rows.shape[0], W, d))
    weights = win_sc.double().softmax(dim=1).to(torch.float32)
    return (win_kv * weights).sum(dim=1), rows


def _finish_ref(pooled, rows, norm_weight, cos, sin, ratio: int, eps: float, act_dtype) -> torch.Tensor:
    """RMSNorm and RoPE of pooled rows, in act_dtype (the model's arithmetic)."""
    x = pooled.to(act_dtype).float()
    y = (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * norm_weight.float()).to(act_dtype)
    pos = rows[:, 2] - (ratio - 1)
    c, s = cos[pos], sin[pos]
    rd = 2 * cos.shape[1]
    rot = y[:, -rd:].float().unflatten(-1, (-1, 2))
    a, bb = rot[..., 0], rot[..., 1]
    out = torch.stack([a * c - bb * s, a * s + bb * c], dim=-1).flatten(-2)
    return torch.cat([y[:, :-rd], out.to(act_dtype)], dim=-1)


def _flat_rows(rows, page_table, ratio: int, n_pages: int, rows_per_page: int) -> torch.Tensor:
    ent = torch.div(rows[:, 2] + 1, ratio, rounding_mode="floor") - 1
    pi = torch.div(ent, rows_per_page, rounding_mode="floor")
    in_table = pi < page_table.shape[1]
    page = page_table.long()[rows[:, 1], pi.clamp(max=page_table.shape[1] - 1)]
    ok = in_table & (page >= 0) & (page < n_pages)
    return torch.where(ok, page * rows_per_page + ent % rows_per_page, -1)


def _fp8_nope_ref(y: torch.Tensor, rope: int) -> torch.Tensor:
    g = y[:, :-rope].float().unflatten(-1, (-1, FP8_BLOCK))
    scale = g.abs().amax(-1, keepdim=True).clamp_min(AMAX_FLOOR) / FP8_MAIN_MAX
    mantissa, exponent = torch.frexp(scale)
    scale = torch.ldexp(torch.ones_like(scale), torch.where(mantissa == 0.5, exponent - 1, exponent))
    q = (g / scale).clamp(-FP8_MAIN_MAX, FP8_MAIN_MAX).to(torch.float8_e4m3fn).float()
    return torch.cat([(q * scale).flatten(-2).to(y.dtype), y[:, -rope:]], dim=-1)


def compress_main_ref(kv, score, ape, kv_state, score_state, slot_ids, plan: CompressPlan, norm_weight, cos, sin,
                      cache, page_table, *, eps: float, act_dtype: torch.dtype, fp8_nope: bool = True,
                      row_layout: KVRowLayout | None = None) -> None:
    d = row_layout.head_dim if row_layout is not None else cache.shape[2]
    pooled, rows = pool_windows_ref(kv, score, ape, kv_state, score_state, slot_ids, plan, d)
    if rows.shape[0] == 0:
        return
    y = _finish_ref(pooled, rows, norm_weight, cos, sin, plan.ratio, eps, act_dtype)
    if row_layout is not None:  # the codes of the rounding below, with its scales
        flat = _flat_rows(rows, page_table, plan.ratio, cache.shape[0], cache.shape[1])
        ok = flat >= 0
        cache.view(-1, cache.shape[2])[flat[ok]] = pack_kv_rows_ref(y[ok], row_layout)
        return
    if fp8_nope:
        y = _fp8_nope_ref(y, 2 * cos.shape[1])
    flat = _flat_rows(rows, page_table, plan.ratio, cache.shape[0], cache.shape[1])
    ok = flat >= 0
    cache.view(-1, d)[flat[ok]] = y[ok].to(cache.dtype)


def sylvester_hadamard(n: int, device=None) -> torch.Tensor:
    """H_n / √n in Sylvester order, fp32 [n, n]."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h * n**-0.5).to(device)


def _rotate_ref(y: torch.Tensor) -> torch.Tensor:
    """y · H (fp32 GEMM, at least MIN_GEMM_ROWS rows on the CPU: the model's batch-invariant linear)."""
    x = y.float()
    n = x.shape[0]
    if x.device.type == "cpu" and n < MIN_GEMM_ROWS:
        x = torch.cat([x, x.new_zeros(MIN_GEMM_ROWS - n, x.shape[1])])
    h = sylvester_hadamard(INDEX_DIM, x.device)
    return F.linear(x, h.T.contiguous())[:n]


def compress_indexer_ref(kv, score, ape, kv_state, score_state, slot_ids, plan: CompressPlan, norm_weight, cos,
                         sin, cache, page_table, *, eps: float, act_dtype: torch.dtype,
                         scale_fmt: str = "ue8m0") -> None:
    pooled, rows = pool_windows_ref(kv, score, ape, kv_state, score_state, slot_ids, plan, INDEX_DIM)
    if rows.shape[0] == 0:
        return
    z = _rotate_ref(_finish_ref(pooled, rows, norm_weight, cos, sin, plan.ratio, eps, act_dtype))
    flat = _flat_rows(rows, page_table, plan.ratio, cache.shape[0], cache.shape[1])
    ok = flat >= 0
    indexer_cache_write_ref(cache, z[ok], flat[ok], scale_fmt)


__all__ = ["CompressConfig", "compress_indexer", "compress_indexer_ref", "compress_main", "compress_main_ref",
           "default_config", "pool_windows_ref", "sylvester_hadamard"]
