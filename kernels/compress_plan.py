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


def _as_host_ints(name: str, x: IntsLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.dim() != 1 or x.dtype.is_floating_point or x.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D sequence of integers, got {x.dtype} of shape {tuple(x.shape)}")
        return x.detach().to("cpu").numpy().astype(np.int64, copy=False)
    t = torch.tensor(list(x), dtype=torch.int64)
    if t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D sequence of integers, got {t.dtype} of shape {tuple(t.shape)}")
    return t.numpy()


def _check_inputs(starts: IntsLike, num_new: IntsLike) -> tuple[np.ndarray, np.ndarray]:
    s, n = _as_host_ints("starts", starts), _as_host_ints("num_new", num_new)
    if s.shape != n.shape:
        raise ValueError(f"starts and num_new must have one entry a request, got {s.size} and {n.size}")
    if s.size and (s.min() < 0 or n.min() < 0):
        raise ValueError(f"starts and num_new must be ≥ 0, got starts={s.tolist()} num_new={n.tolist()}")
    if s.size and int((s + n).max()) >= 2**31:
        raise ValueError("positions must fit in int32")
    return s, n


def _check_ratio(ratio: int, overlap: bool) -> int:
    if not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"ratio must be a positive int, got {ratio!r}")
    return (2 if overlap else 1) * ratio


def _finish(columns: tuple[np.ndarray, ...], counts: np.ndarray, capacity: int | None, device, what: str) -> RowPlan:
    """The plan of rows whose FIELDS columns are `columns`, padded to `capacity` with −1 rows, on `device`."""
    num_rows = columns[0].shape[0]
    if capacity is not None and capacity < num_rows:
        raise ValueError(f"{what} needs {num_rows} rows, more than capacity={capacity}")
    rows = np.full((num_rows if capacity is None else capacity, FIELDS), -1, dtype=np.int32)
    for j, column in enumerate(columns):
        rows[:num_rows, j] = column
    cu_host = np.zeros(counts.shape[0] + 1, dtype=np.int32)
    counts.cumsum(out=cu_host[1:])
    device = torch.device("cpu") if device is None else torch.device(device)
    cu = torch.from_numpy(cu_host)
    return RowPlan(torch.from_numpy(rows).to(device), cu.to(device), cu, num_rows)


def _segments(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(request of each row, index of the row within its request) for per-request row counts."""
    b = np.arange(counts.shape[0]).repeat(counts)
    first = counts.cumsum() - counts
    return b, np.arange(b.shape[0]) - first[b]


# The builders work in numpy on the host: a plan is ~20 small array operations, each a few µs as a torch CPU op
# against ~1 µs in numpy (five plans an eager forward; bench/RESULTS.md, "The decode worker's per-step host work").


def build_write_plan(starts: IntsLike, num_new: IntsLike, size: int, *, device=None,
                     capacity: int | None = None) -> RowPlan:
    """Rows [ragged_id, batch_id, position, position % size] of each request's last min(n, size) positions."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    s, n = _check_inputs(starts, num_new)
    return _write_plan(s, n, size, device, capacity)


def _write_plan(s: np.ndarray, n: np.ndarray, size: int, device, capacity: int | None) -> RowPlan:
    counts = np.minimum(n, size)
    b, i = _segments(counts)
    first_row = n.cumsum() - counts  # ragged row of each request's first saved position
    pos = s[b] + (n - counts)[b] + i  # (n − counts + i: the row's offset within the request's new tokens)
    return _finish((first_row[b] + i, b, pos, pos % size), counts, capacity, device, "write plan")


def build_compress_plan(starts: IntsLike, num_new: IntsLike, ratio: int, overlap: bool, *, device=None,
                        capacity: int | None = None, write_capacity: int | None = None) -> CompressPlan:
    """The compress plan and the state-ring write plan of one forward (module docstring)."""
    window = _check_ratio(ratio, overlap)
    s, n = _check_inputs(starts, num_new)
    counts = (s + n) // ratio - s // ratio
    b, i = _segments(counts)
    first_entry = (s + ratio) // ratio - 1  # first entry committed by request b
    pos = (first_entry[b] + i) * ratio + ratio - 1
    ragged = (n.cumsum() - n)[b] + pos - s[b]
    lo = np.maximum(pos - window + 1, 0)
    window_len = np.maximum(np.minimum(s[b], pos + 1) - lo, 0)
    commit = _finish((ragged, b, pos, window_len), counts, capacity, device, "compress plan")
    write = _write_plan(s, n, window, device, write_capacity)
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
    return _finish(tuple(np.array(rows, dtype=np.int64).reshape(-1, FIELDS).T), np.array(counts, dtype=np.int64),
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
    commit = _finish(tuple(np.array(rows, dtype=np.int64).reshape(-1, FIELDS).T), np.array(counts, dtype=np.int64),
                     capacity, device, "compress plan")
    write = build_write_plan_ref(s, n, window, device=device, capacity=write_capacity)
    return CompressPlan(ratio, overlap, window, commit, write)
