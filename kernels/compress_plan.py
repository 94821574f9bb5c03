"""Packed compress plans: built once per forward, shared by every compressor of one (ratio, overlap).

A forward is a ragged batch: request b brings num_new[b] tokens at positions starts[b] … starts[b]+num_new[b]−1,
flattened request after request (row r of the batch input). docs/dsv4-spec.md "Compressor": entry e is committed
while position p = e·ratio + ratio − 1 is processed, pooling a window of W = coff·ratio positions
p − W + 1 … p (coff = 2 with overlap, else 1); positions before the request's start live in its state ring
(row p % state_size, state_size = W), positions below 0 are padding.

Compress plan, one int32 row (16 bytes) per committed entry, request after request, entries in order:

    [ragged_id, batch_id, position, window_len]
    ragged_id  = row of position p in the flattened batch input
    batch_id   = b
    position   = p = e·ratio + ratio − 1        (so e = (p + 1) // ratio − 1)
    window_len = count of window positions in [max(0, p − W + 1), starts[b]): rows read from the ring

The window rows are then: W − 1 − p padding rows first (when p < W − 1), window_len ring rows, and the
rest (ending at ragged_id) from this forward's input. The compressor kernels rely on exactly this.

Write plan (the state rings, or with size = window the SWA ring), one int32 row per position to save:
the last min(num_new[b], size) positions of each request, in order,

    [ragged_id, batch_id, position, ring_row = position % size]

Positions of one request map to distinct ring rows, so no two rows of a write plan write the same place.

Per-request prefix sums `cu` [B+1] (int32) into both plans, on the host and on the device. Fixed capacity
(CUDA graphs): rows past the real ones are −1 and kernels skip them; a decode step (one token a request)
needs capacity = B for both plans (at most one commit and one ring row a request).

API
    build_compress_plan(starts, num_new, ratio, overlap, *, device=None, capacity=None,
                        write_capacity=None) -> CompressPlan
    build_write_plan(starts, num_new, size, *, device=None, capacity=None) -> RowPlan   (SWA: size=window)
    build_compress_plan_ref(...), build_write_plan_ref(...): per-token brute-force builders (same results)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

FIELDS = 4  # int32 fields a plan row: 16 bytes

IntsLike = Sequence[int] | torch.Tensor


@dataclass(frozen=True, slots=True)
class RowPlan:
    rows: torch.Tensor  # [capacity or num_rows, 4] int32 on the device, −1 rows past num_rows
    cu: torch.Tensor  # [B+1] int32 on the device: request b owns rows cu[b] … cu[b+1]−1
    cu_host: torch.Tensor  # [B+1] int32 on the CPU
    num_rows: int


@dataclass(frozen=True, slots=True)
class CompressPlan:
    ratio: int
    overlap: bool
    state_size: int  # = window of pooled positions = coff · ratio
    commit: RowPlan  # [ragged_id, batch_id, position, window_len] per committed entry
    write: RowPlan  # [ragged_id, batch_id, position, ring_row] per position saved into the state ring


def _as_host_ints(name: str, x: IntsLike) -> torch.Tensor:
    t = x.detach().to("cpu") if isinstance(x, torch.Tensor) else torch.tensor(list(x), dtype=torch.int64)
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D sequence of integers, got {t.dtype} of shape {tuple(t.shape)}")
    return t.to(torch.int64)


def _check_inputs(starts: IntsLike, num_new: IntsLike) -> tuple[torch.Tensor, torch.Tensor]:
    s, n = _as_host_ints("starts", starts), _as_host_ints("num_new", num_new)
    if s.shape != n.shape:
        raise ValueError(f"starts and num_new must have one entry a request, got {s.numel()} and {n.numel()}")
    if bool((s < 0).any()) or bool((n < 0).any()):
        raise ValueError(f"starts and num_new must be ≥ 0, got starts={s.tolist()} num_new={n.tolist()}")
    if s.numel() and int((s + n).max()) >= 2**31:
        raise ValueError("positions must fit in int32")
    return s, n


def _check_ratio(ratio: int, overlap: bool) -> int:
    if not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"ratio must be a positive int, got {ratio!r}")
    return (2 if overlap else 1) * ratio


def _finish(rows: torch.Tensor, counts: torch.Tensor, capacity: int | None, device, what: str) -> RowPlan:
    """Pad `rows` [R, 4] to `capacity` with −1 rows and move the plan to `device`."""
    num_rows = rows.shape[0]
    if capacity is not None:
        if capacity < num_rows:
            raise ValueError(f"{what} needs {num_rows} rows, more than capacity={capacity}")
        rows = torch.cat([rows, rows.new_full((capacity - num_rows, FIELDS), -1)])
    cu_host = torch.zeros(counts.numel() + 1, dtype=torch.int32)
    cu_host[1:] = counts.cumsum(0)
    device = torch.device("cpu") if device is None else torch.device(device)
    return RowPlan(rows.to(torch.int32).to(device), cu_host.to(device), cu_host, num_rows)


def _segments(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(request of each row, index of the row within its request) for per-request row counts."""
    # numpy's repeat: torch.repeat_interleave on CPU tensors took ~12 ms a call on a busy 2-core host
    b = torch.from_numpy(np.repeat(np.arange(counts.numel()), counts.numpy()))
    first = torch.cumsum(counts, 0) - counts
    return b, torch.arange(int(counts.sum())) - first[b]


def build_write_plan(starts: IntsLike, num_new: IntsLike, size: int, *, device=None,
                     capacity: int | None = None) -> RowPlan:
    """Rows [ragged_id, batch_id, position, position % size] of each request's last min(n, size) positions."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    s, n = _check_inputs(starts, num_new)
    counts = n.clamp(max=size)
    b, i = _segments(counts)
    first_row = torch.cumsum(n, 0) - counts  # ragged row of each request's first saved position
    offset = n[b] - counts[b] + i  # offset of the row within the request's new tokens
    pos = s[b] + offset
    rows = torch.stack([first_row[b] + i, b, pos, pos % size], dim=1)
    return _finish(rows, counts, capacity, device, "write plan")


def build_compress_plan(starts: IntsLike, num_new: IntsLike, ratio: int, overlap: bool, *, device=None,
                        capacity: int | None = None, write_capacity: int | None = None) -> CompressPlan:
    """The compress plan and the state-ring write plan of one forward (module docstring)."""
    window = _check_ratio(ratio, overlap)
    s, n = _check_inputs(starts, num_new)
    counts = torch.div(s + n, ratio, rounding_mode="floor") - torch.div(s, ratio, rounding_mode="floor")
    b, i = _segments(counts)
    first_entry = torch.div(s + ratio, ratio, rounding_mode="floor") - 1  # first entry committed by request b
    pos = (first_entry[b] + i) * ratio + ratio - 1
    ragged = (torch.cumsum(n, 0) - n)[b] + pos - s[b]
    lo = (pos - window + 1).clamp(min=0)
    window_len = (torch.minimum(s[b], pos + 1) - lo).clamp(min=0)
    rows = torch.stack([ragged, b, pos, window_len], dim=1)
    commit = _finish(rows, counts, capacity, device, "compress plan")
    write = build_write_plan(s, n, window, device=device, capacity=write_capacity)
    return CompressPlan(ratio, overlap, window, commit, write)


# ----------------------------------------------------------------------------------------------------
# Brute-force builders: one token at a time, the definition the vectorized ones are tested against.


def build_write_plan_ref(starts: IntsLike, num_new: IntsLike, size: int, *, device=None,
                         capacity: int | None = None) -> RowPlan:
    s, n = _check_inputs(starts, num_new)
    rows, counts, r = [], [], 0
    for b, (start, count) in enumerate(zip(s.tolist(), n.tolist(), strict=True)):
        mine = [[r + k, b, start + k, (start + k) % size] for k in range(count) if k >= count - size]
        rows += mine
        counts.append(len(mine))
        r += count
    return _finish(torch.tensor(rows, dtype=torch.int64).reshape(-1, FIELDS), torch.tensor(counts, dtype=torch.int64),
                   capacity, device, "write plan")


def build_compress_plan_ref(starts: IntsLike, num_new: IntsLike, ratio: int, overlap: bool, *, device=None,
                            capacity: int | None = None, write_capacity: int | None = None) -> CompressPlan:
    window = _check_ratio(ratio, overlap)
    s, n = _check_inputs(starts, num_new)
    rows, counts, r = [], [], 0
    for b, (start, count) in enumerate(zip(s.tolist(), n.tolist(), strict=True)):
        before = len(rows)
        for k in range(count):
            p = start + k
            if (p + 1) % ratio == 0:
                from_ring = sum(1 for q in range(p - window + 1, p + 1) if 0 <= q < start)
                rows.append([r + k, b, p, from_ring])
        counts.append(len(rows) - before)
        r += count
    commit = _finish(torch.tensor(rows, dtype=torch.int64).reshape(-1, FIELDS),
                     torch.tensor(counts, dtype=torch.int64), capacity, device, "compress plan")
    write = build_write_plan_ref(s, n, window, device=device, capacity=write_capacity)
    return CompressPlan(ratio, overlap, window, commit, write)
