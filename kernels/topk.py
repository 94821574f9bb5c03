"""Row-wise top-k over a prefix of each row: the lightning indexer's selection (docs/dsv4-spec.md "Indexer").

For row t of `scores` [T, E] and n_t = clamp(visible[t], 0, E):

    out[t, :min(k, n_t)] = positions of the k largest scores[t, :n_t], ties broken by the lower position
    out[t, min(k, n_t):] = −1

order="score" (the contract's order): descending score, equal scores lower position first.
order="position": the same set in ascending position (no sort: cheaper, and what a gather prefers).

Kernel: scores become order-preserving int32 keys (the float's bits, all but the sign flipped for negative
values). One program per (row, segment of ≤ 16384 positions) holds its segment in registers and
1. finds the k-th largest key by binary search on the key, keeping count(key ≥ lo) ≥ k > count(key ≥ hi)
   and stopping as soon as count(key ≥ lo) == k (continuous data: ~log2(n) + a few steps, never more than
   32); each step is one count over the segment, ≈ 0.6 µs at 8192 keys on H100. `TopkConfig(radix=True)`
   finds it by radix select instead: 4 dependent steps, each a 256-bin histogram of one byte of the keys
   that share the bytes found so far (not timed yet: bench/bench_indexer.py measures both; on AMD it
   spills as many SGPRs as the binary search, 6-152 in the compile check, so the spills come from the rest
   of the kernel);
2. compacts the selection in position order: one packed cumsum gives every selected element its output slot
   (all keys above the threshold, then the first `need` keys equal to it);
3. for order="score" sorts the k (key, position) pairs as one 64-bit composite with tl.sort.
A row longer than one segment is cut into segments that each keep their top-k candidates in position order
(so ties still resolve by position), and the same kernel runs on the candidates until one segment holds them.

Supported: fp32 scores (±inf included; the rank of a NaN is unspecified), 1 ≤ k ≤ 4096 on Triton
(any k in the reference), any E. No host synchronization: the launch depends on shapes only (CUDA graphs).
Portability: plain Triton, no tl.dot; the sort reloads the compacted pairs through L2 (`.cg`) after a CTA
barrier, which also orders global memory on AMD, whose L1 is not coherent for such reloads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import triton
import triton.language as tl

from sparsepd.kernels.device import Backend, pick_backend

Order = Literal["score", "position"]

_KEY_NONE = tl.constexpr(-(2**31))  # the key of a masked position: below every float's key
_MAX_SEG = 16384  # positions a program holds (32 keys a thread at 16 warps); cumsum fields pack 16 bits
_MAX_TRITON_K = 4096


@triton.jit
def _score_to_key(x):
    """float → int32 key ordered as the floats: negative values get all but the sign bit flipped."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _bisect_threshold(key, n_valid, k):
    """(lo, g, need): take every key ≥ g, then the first `need` keys == lo by position.
    Binary search for the k-th largest key, keeping count(key >= lo) = c_lo >= k > c_hi = count(key >= hi);
    done when c_lo == k (the keys >= lo are the answer) or hi == lo + 1 (lo is the k-th key, ties included).
    Each step is one count over the segment. (Regula falsi on the count in score space, and gathering the
    keys left in [lo, hi) into a short row, halved the steps but not the time on H100: see bench/RESULTS.md.)"""
    lo = tl.full([], _KEY_NONE + 1, tl.int64)
    hi = tl.full([], 2**31, tl.int64)
    c_lo = n_valid
    c_hi = n_valid * 0
    while (c_lo > k) & (hi - lo > 1):
        mid = lo + (hi - lo) // 2
        c = tl.sum((key >= mid.to(tl.int32)).to(tl.int32))
        up = c >= k
        lo = tl.where(up, mid, lo)
        c_lo = tl.where(up, c, c_lo)
        hi = tl.where(up, hi, mid)
        c_hi = tl.where(up, c_hi, c)
    exact = c_lo <= k  # keys >= lo are exactly the min(k, n_valid) to take
    g = tl.where(exact, lo, hi)
    need = tl.where(exact, 0, k - c_hi)
    return lo, g, need


@triton.jit
def _radix_threshold(key, valid, n_valid, k):
    """(lo, g, need) as `_bisect_threshold`, by a radix select: the k-th largest key is found one byte at a time,
    high byte first, in 4 dependent steps instead of up to 32. Step p: a 256-bin histogram of byte p of the keys
    that share the bytes found so far; the byte is the largest b whose count of keys with byte ≥ b reaches the
    rank still wanted; that rank drops by the keys above b."""
    u = (key.to(tl.int64) - _KEY_NONE)  # unsigned order: 0 … 2^32 − 1
    b = tl.arange(0, 256)
    match = valid
    rank = tl.minimum(n_valid, k)  # the rank of the threshold among the keys still matching
    total = n_valid
    prefix = tl.full([], 0, tl.int64)
    for p in tl.static_range(4):
        digit = ((u >> (24 - 8 * p)) & 0xFF).to(tl.int32)
        h = tl.histogram(digit, 256, mask=match)  # [256]
        at_least = total - (tl.cumsum(h, 0) - h)  # keys with this byte ≥ b
        d = tl.sum((at_least >= rank).to(tl.int32)) - 1
        rank = rank - tl.sum(tl.where(b > d, h, 0))
        total = tl.sum(tl.where(b == d, h, 0))
        prefix = prefix * 256 + d
        match = match & (digit == d)
    threshold = prefix + _KEY_NONE  # the k-th largest key
    exact = n_valid <= k  # then every valid key is taken
    lo = tl.where(exact, _KEY_NONE + 1, threshold)
    g = tl.where(exact, _KEY_NONE + 1, threshold + 1)
    need = tl.where(exact, 0, rank)
    return lo, g, need


@triton.jit
def _select_kernel(
    src_ptr, src_idx_ptr, visible_ptr, out_key_ptr, out_idx_ptr, tmp_key_ptr, tmp_idx_ptr,
    row_len, src_stride, out_stride, k,
    SEG: tl.constexpr, K_PAD: tl.constexpr, FROM_SCORES: tl.constexpr, FINAL: tl.constexpr, SORT: tl.constexpr,
    RADIX: tl.constexpr,
):
    seg = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    pos = seg * SEG + tl.arange(0, SEG)
    if FROM_SCORES:
        n_row = tl.minimum(tl.maximum(tl.load(visible_ptr + row), 0), row_len)
        valid = pos < n_row
        key = tl.where(valid, _score_to_key(tl.load(src_ptr + row * src_stride + pos, mask=valid, other=0.0)),
                       _KEY_NONE)
        idx = pos
    else:
        key = tl.load(src_ptr + row * src_stride + pos, mask=pos < row_len, other=_KEY_NONE)
        valid = key != _KEY_NONE
        idx = tl.load(src_idx_ptr + row * src_stride + pos, mask=valid, other=-1)
    n_valid = tl.sum(valid.to(tl.int32))

    if RADIX:
        lo, g, need = _radix_threshold(key, valid, n_valid, k)
    else:
        lo, g, need = _bisect_threshold(key, n_valid, k)
    key64 = key.to(tl.int64)

    gt = key64 >= g
    eq = (key64 == lo) & (key64 < g)
    packed = gt.to(tl.int32) + (eq.to(tl.int32) << 16)
    before = tl.cumsum(packed, 0) - packed
    gt_before = before & 0xFFFF
    eq_before = before >> 16
    sel = gt | (eq & (eq_before < need))
    slot = gt_before + tl.minimum(eq_before, need)
    n_sel = tl.minimum(n_valid, k)
    j = tl.arange(0, K_PAD)

    if FINAL:
        out_row = out_idx_ptr + row * out_stride
        if SORT:
            tmp_key = tmp_key_ptr + row * K_PAD
            tmp_idx = tmp_idx_ptr + row * K_PAD
            tl.store(tmp_key + slot, key, mask=sel)
            tl.store(tmp_idx + slot, idx, mask=sel)
            tl.debug_barrier()
            has = j < n_sel
            kk = tl.load(tmp_key + j, mask=has, other=_KEY_NONE, cache_modifier=".cg")
            ii = tl.load(tmp_idx + j, mask=has, other=0, cache_modifier=".cg")
            # (key, −position) as one unsigned 64-bit number: descending = score desc, then position asc.
            comp = ((kk.to(tl.int64) - _KEY_NONE).to(tl.uint64) << 32) | (0xFFFFFFFF - ii.to(tl.int64)).to(tl.uint64)
            comp = tl.sort(comp, descending=True)
            ii = (0xFFFFFFFF - (comp & 0xFFFFFFFF).to(tl.int64)).to(tl.int32)
            tl.store(out_row + j, tl.where(has, ii, -1), mask=j < k)
        else:
            tl.store(out_row + slot, idx, mask=sel)
            tl.store(out_row + j, tl.full([K_PAD], -1, tl.int32), mask=(j >= n_sel) & (j < k))
    else:
        base = row * out_stride + seg * k
        tl.store(out_key_ptr + base + slot, key, mask=sel)
        tl.store(out_idx_ptr + base + slot, idx, mask=sel)
        fill = (j >= n_sel) & (j < k)
        tl.store(out_key_ptr + base + j, tl.full([K_PAD], _KEY_NONE, tl.int32), mask=fill)


@dataclass(frozen=True, slots=True)
class TopkConfig:
    """Launch parameters of `_select_kernel` (None: `default_topk_config`)."""

    keys_per_thread: int  # a segment's keys a thread holds: sets num_warps (4 … 16)
    radix: bool = False  # the threshold by radix select (4 histogram steps) instead of binary search


def default_topk_config(n_programs: int, num_sms: int) -> TopkConfig:
    """Few rows (decode): 32 keys a thread (8 warps for 8192 keys): 18.8 µs vs 27.7 µs with 64 keys a thread
    (4 warps), B = 32 rows of 8192 on H100. Many rows (prefill): 64 keys a thread, more programs an SM:
    448 µs vs 497 µs for 4096 rows of 8192."""
    return TopkConfig(64 if n_programs >= 2 * num_sms else 32)


def _warps(seg: int, config: TopkConfig) -> int:
    return max(4, min(16, seg // (32 * config.keys_per_thread)))


def _check_topk_inputs(scores: torch.Tensor, visible: torch.Tensor, k: int, order: str) -> None:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a [T, E] tensor, got {getattr(scores, 'shape', type(scores))}")
    if scores.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"scores must be float32 (float64 in the reference), got {scores.dtype}")
    if not isinstance(visible, torch.Tensor) or visible.shape != (scores.shape[0],):
        raise ValueError(f"visible must be [T={scores.shape[0]}], got {getattr(visible, 'shape', type(visible))}")
    if visible.dtype != torch.int32:
        raise TypeError(f"visible must be int32, got {visible.dtype}")
    if visible.device != scores.device:
        raise ValueError(f"visible is on {visible.device}, scores on {scores.device}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if order not in ("score", "position"):
        raise ValueError(f"order must be 'score' or 'position', got {order!r}")


def _check_out(out: torch.Tensor | None, shape: tuple[int, int], device: torch.device) -> None:
    if out is None:
        return
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape or out.dtype != torch.int32:
        raise ValueError(f"out must be int32 {list(shape)}, got {getattr(out, 'dtype', out)} "
                         f"{list(getattr(out, 'shape', ()))}")
    if out.device != device or not out.is_contiguous():
        raise ValueError(f"out must be contiguous on {device}, got {out.device}, strides {out.stride()}")


def topk_visible(
    scores: torch.Tensor,  # [T, E] fp32
    visible: torch.Tensor,  # [T] int32: row t ranks scores[t, :visible[t]]
    k: int,
    *,
    order: Order = "score",
    out: torch.Tensor | None = None,  # [T, k] int32
    backend: Backend = "auto",
    config: TopkConfig | None = None,
) -> torch.Tensor:
    """Positions of the k largest of each row's first visible[t] scores, −1 padded: int32 [T, k] (module doc)."""
    _check_topk_inputs(scores, visible, k, order)
    _check_out(out, (scores.shape[0], k), scores.device)
    if pick_backend(backend, scores, visible) == "reference":
        return topk_visible_ref(scores, visible, k, order=order, out=out)
    if scores.dtype != torch.float32 or scores.stride(1) != 1:
        raise ValueError(f"Triton top-k needs float32 scores with unit last stride, got {scores.dtype}, "
                         f"strides {scores.stride()}")
    if k > _MAX_TRITON_K:
        raise ValueError(f"Triton top-k supports k <= {_MAX_TRITON_K}, got k={k}")
    T, E = scores.shape
    out = torch.empty((T, k), dtype=torch.int32, device=scores.device) if out is None else out
    if T == 0:
        return out
    if config is not None and config.keys_per_thread < 1:
        raise ValueError(f"config.keys_per_thread must be >= 1, got {config}")
    k_pad = max(16, triton.next_power_of_2(k))
    src, src_idx, row_len, from_scores = scores, scores, E, True
    while triton.next_power_of_2(max(row_len, 1)) > _MAX_SEG:  # candidate rounds: each keeps k per segment
        seg = 8192 if 4 * k_pad <= 8192 else _MAX_SEG
        n_seg = triton.cdiv(row_len, seg)
        cand_key = torch.empty((T, n_seg * k), dtype=torch.int32, device=scores.device)
        cand_idx = torch.empty((T, n_seg * k), dtype=torch.int32, device=scores.device)
        _launch_select(src, src_idx, visible, cand_key, cand_idx, row_len, k, seg, n_seg, k_pad, from_scores,
                       False, False, config)
        src, src_idx, row_len, from_scores = cand_key, cand_idx, n_seg * k, False
    seg = max(16, triton.next_power_of_2(max(row_len, 1)))
    _launch_select(src, src_idx, visible, out, out, row_len, k, seg, 1, k_pad, from_scores, True,
                   order == "score", config)
    return out


def _launch_select(src, src_idx, visible, out_key, out_idx, row_len, k, seg, n_seg, k_pad, from_scores, final,
                   sort, config: TopkConfig | None) -> None:
    T = src.shape[0]
    if config is None:
        num_sms = torch.cuda.get_device_properties(src.device).multi_processor_count if src.is_cuda else 1
        config = default_topk_config(T * n_seg, num_sms)
    tmp_key = tmp_idx = out_idx
    if sort:
        tmp_key = torch.empty((T, k_pad), dtype=torch.int32, device=src.device)
        tmp_idx = torch.empty((T, k_pad), dtype=torch.int32, device=src.device)
    _select_kernel[(n_seg, T)](
        src, src_idx, visible, out_key, out_idx, tmp_key, tmp_idx,
        row_len, src.stride(0), out_idx.stride(0), k,
        SEG=seg, K_PAD=k_pad, FROM_SCORES=from_scores, FINAL=final, SORT=sort, RADIX=config.radix,
        num_warps=_warps(seg, config),
    )


def topk_visible_ref(
    scores: torch.Tensor, visible: torch.Tensor, k: int, *, order: Order = "score", out: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain PyTorch: mask positions ≥ visible[t] to −inf, stable descending sort, keep k, −1 pad.

    Deterministic and independent of the batch: a row's result depends on its own scores only.
    """
    _check_topk_inputs(scores, visible, k, order)
    _check_out(out, (scores.shape[0], k), scores.device)
    T, E = scores.shape
    pos = torch.arange(E, device=scores.device)
    n = visible.long().clamp(0, E)[:, None]  # [T, 1]
    masked = torch.where(pos[None, :] < n, scores, float("-inf"))
    top = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :k]  # [T, min(k, E)]
    top = torch.where(pos[None, : top.shape[1]] < n, top, -1)
    if order == "position":
        top = torch.where(top < 0, E, top).sort(dim=1).values
        top = torch.where(top == E, -1, top)
    res = torch.full((T, k), -1, dtype=torch.int32, device=scores.device)
    res[:, : top.shape[1]] = top.to(torch.int32)
    return res if out is None else out.copy_(res)
