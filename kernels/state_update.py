"""Ring writes of one forward: the compressor state rings and the sliding-window (SWA) ring.

docs/dsv4-spec.md "Compressor" and docs/DESIGN.md §6. A write plan (kernels/compress_plan.py) holds one row
[ragged_id, batch_id, position, ring_row] for each of a request's last min(num_new, size) positions:

    compressor_state_write:  kv_state[slot, p % S]    = kv[r]
                             score_state[slot, p % S] = score[r] + ape[p % ratio]     (S = plan.state_size)
    swa_ring_write:          swa_ring[slot, p % window] = kv[r]                        (plan built with size = window)

with slot = slot_ids[batch_id]. A request's positions in one plan land on distinct ring rows, so no two
programs write the same place. Order within a forward: the compressor reads the rings first
(kernels/compressor.py), then `compressor_state_write`; the SWA write after the attention that reads the ring.

API (`backend` as in kernels/device.py):
    compressor_state_write(kv, score, ape, kv_state, score_state, slot_ids, plan, *, backend="auto") -> None
        kv, score [N, C] fp32 (score without ape), ape [ratio, C], rings [num_slots, S, C] fp32,
        slot_ids [B] int32/int64, plan: the forward's CompressPlan (its write rows; −1 rows skipped)
    swa_ring_write(kv, swa_ring, slot_ids, plan, *, backend="auto") -> None
        kv [N, D] and swa_ring [num_slots, window, D] of one dtype, plan: a RowPlan built with size = window
    compressor_state_write_ref, swa_ring_write_ref: same signatures, plain PyTorch.

Kernel: one launch copies one plan row a program; for the compressor rings a second grid axis picks
kv (0) or score (1, plus the bias), so both rings take one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsepd.kernels.compress_plan import CompressPlan, RowPlan
from sparsepd.kernels.device import Backend, pick_backend

BLOCK_R = 1  # one row a program: decode batches have one row a request (more programs in flight)


@triton.jit
def _ring_write_kernel(
    src0_ptr, dst0_ptr, src1_ptr, dst1_ptr, bias_ptr, slot_ptr, plan_ptr, n_rows, ring_size, ratio,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row = plan_ptr + r.to(tl.int64) * 4
    ragged = tl.load(row, mask=r < n_rows, other=-1)
    live = ragged >= 0
    b = tl.load(row + 1, mask=live, other=0)
    p = tl.load(row + 2, mask=live, other=0)
    slot = tl.load(slot_ptr + b, mask=live, other=0).to(tl.int64)
    src = ragged.to(tl.int64) * WIDTH
    dst = (slot * ring_size + p % ring_size) * WIDTH
    second = tl.program_id(1) == 1
    for c0 in range(0, WIDTH, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = live[:, None] & (c < WIDTH)[None, :]
        if second:
            x = tl.load(src1_ptr + src[:, None] + c[None, :], mask=m)
            if HAS_BIAS:
                x = x + tl.load(bias_ptr + ((p % ratio) * WIDTH)[:, None] + c[None, :], mask=m)
            tl.store(dst1_ptr + dst[:, None] + c[None, :], x, mask=m)
        else:
            x = tl.load(src0_ptr + src[:, None] + c[None, :], mask=m)
            tl.store(dst0_ptr + dst[:, None] + c[None, :], x, mask=m)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_common(src: torch.Tensor, ring: torch.Tensor, slot_ids: torch.Tensor, plan: RowPlan, what: str) -> None:
    for name, t in (("kv", src), (what, ring), ("slot_ids", slot_ids), ("plan rows", plan.rows)):
        _need(isinstance(t, torch.Tensor), f"{name} must be a tensor, got {type(t).__name__}")
        _need(t.device == src.device, f"{name} is on {t.device}, expected {src.device} (kv's device)")
        _need(t.is_contiguous(), f"{name} must be contiguous, got strides {t.stride()}")
    _need(src.dim() == 2, f"kv must be [N, width], got {tuple(src.shape)}")
    _need(ring.dim() == 3 and ring.shape[2] == src.shape[1],
          f"{what} must be [num_slots, ring_size, {src.shape[1]}], got {tuple(ring.shape)}")
    _need(slot_ids.dim() == 1 and slot_ids.dtype in (torch.int32, torch.int64),
          f"slot_ids must be a 1-D int32/int64 tensor, got {slot_ids.dtype} {tuple(slot_ids.shape)}")
    _need(plan.rows.dtype == torch.int32 and plan.rows.dim() == 2 and plan.rows.shape[1] == 4,
          f"plan rows must be int32 [R, 4], got {plan.rows.dtype} {tuple(plan.rows.shape)}")


def _launch(src0, dst0, src1, dst1, bias, slot_ids, rows, ring_size: int, ratio: int) -> None:
    n = rows.shape[0]
    if n == 0:
        return
    width = src0.shape[1]
    block_c = min(triton.next_power_of_2(width), 1024)
    _ring_write_kernel[(triton.cdiv(n, BLOCK_R), 1 if src1 is None else 2)](
        src0, dst0, src0 if src1 is None else src1, dst0 if dst1 is None else dst1, src0 if bias is None else bias,
        slot_ids, rows, n, ring_size, ratio,
        WIDTH=width, HAS_BIAS=bias is not None, BLOCK_R=BLOCK_R, BLOCK_C=block_c, num_warps=4,
    )


def compressor_state_write(kv, score, ape, kv_state, score_state, slot_ids, plan: CompressPlan, *,
                           backend: Backend = "auto") -> None:
    """Save each request's last state_size positions into its compressor rings (module docstring)."""
    _need(isinstance(plan, CompressPlan), f"plan must be a CompressPlan, got {type(plan).__name__}")
    _check_common(kv, kv_state, slot_ids, plan.write, "kv_state")
    for name, t in (("score", score), ("ape", ape), ("score_state", score_state)):
        _need(isinstance(t, torch.Tensor) and t.device == kv.device and t.is_contiguous(),
              f"{name} must be a contiguous tensor on {kv.device}")
    for name, t in (("kv", kv), ("score", score), ("ape", ape), ("kv_state", kv_state), ("score_state", score_state)):
        _need(t.dtype == torch.float32, f"{name} must be float32, got {t.dtype}")
    _need(score.shape == kv.shape, f"score must match kv {tuple(kv.shape)}, got {tuple(score.shape)}")
    _need(score_state.shape == kv_state.shape,
          f"score_state must match kv_state {tuple(kv_state.shape)}, got {tuple(score_state.shape)}")
    _need(kv_state.shape[1] == plan.state_size,
          f"rings hold {kv_state.shape[1]} positions, the plan's state_size is {plan.state_size}")
    _need(ape.shape == (plan.ratio, kv.shape[1]), f"ape must be [{plan.ratio}, {kv.shape[1]}], got {tuple(ape.shape)}")
    if pick_backend(backend, kv, kv_state) == "reference":
        return compressor_state_write_ref(kv, score, ape, kv_state, score_state, slot_ids, plan)
    _launch(kv, kv_state, score, score_state, ape, slot_ids, plan.write.rows, plan.state_size, plan.ratio)


def swa_ring_write(kv, swa_ring, slot_ids, plan: RowPlan, *, backend: Backend = "auto") -> None:
    """Save each request's last `window` KV rows into its sliding-window ring at position % window."""
    _need(isinstance(plan, RowPlan), f"plan must be a RowPlan, got {type(plan).__name__}")
    _check_common(kv, swa_ring, slot_ids, plan, "swa_ring")
    _need(swa_ring.dtype == kv.dtype, f"swa_ring dtype {swa_ring.dtype} must equal kv's {kv.dtype}")
    if pick_backend(backend, kv, swa_ring) == "reference":
        return swa_ring_write_ref(kv, swa_ring, slot_ids, plan)
    _launch(kv, swa_ring, None, None, None, slot_ids, plan.rows, swa_ring.shape[1], 1)


def _live_rows(rows: torch.Tensor) -> torch.Tensor:
    rows = rows.long()
    return rows[rows[:, 0] >= 0]


def compressor_state_write_ref(kv, score, ape, kv_state, score_state, slot_ids, plan: CompressPlan) -> None:
    rows = _live_rows(plan.write.rows)
    r, b, p = rows[:, 0], rows[:, 1], rows[:, 2]
    slot, ring_row = slot_ids.long()[b], p % kv_state.shape[1]
    kv_state[slot, ring_row] = kv[r]
    score_state[slot, ring_row] = score[r] + ape[p % plan.ratio]


def swa_ring_write_ref(kv, swa_ring, slot_ids, plan: RowPlan) -> None:
    rows = _live_rows(plan.rows)
    swa_ring[slot_ids.long()[rows[:, 1]], rows[:, 2] % swa_ring.shape[1]] = kv[rows[:, 0]]
