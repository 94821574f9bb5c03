"""The paged-cache rows of the compressed entries the indexer selected, in one launch.

A CSA layer's indexer returns, per token t, the positions e of its top-k compressed entries (−1 padding). The
sparse attention reads them as rows of the layer's paged cache: entry e lives on the request's page
page_table[seq_ids[t], e // rows_per_page], at row base + page · rows_per_page + e % rows_per_page:

    rows[t, j] = base + page_table[seq_ids[t], e // rpp] · rpp + e % rpp     (e = top[t, j] ≥ 0), else −1

engine/paged_cache.py computed it with ~14 PyTorch launches a layer (clamps, casts, an index, a gather, the
products and sums, a where and the cast to int32); one program per token here.

API (`backend` as in kernels/device.py):
    entry_rows(top, page_table, seq_ids, rows_per_page, base, *, backend="auto") -> rows [T, K] int32
    entry_rows_ref(top, page_table, seq_ids, rows_per_page, base): the PyTorch composition.
top [T, K] int32/int64 (−1 = none), page_table [B, P] int32, seq_ids [T] int32. Every row fits int32 (the pool's
rows are addressed with int32 everywhere).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsepd.kernels.device import Backend, pick_backend


@triton.jit
def _entry_rows_kernel(top_ptr, table_ptr, seq_ptr, out_ptr, K, stride_top, stride_table, stride_out, base,
                       RPP: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    seq = tl.load(seq_ptr + t).to(tl.int64)
    for k0 in range(0, K, BLOCK_K):
        j = k0 + tl.arange(0, BLOCK_K)
        ok = j < K
        e = tl.load(top_ptr + t * stride_top + j, mask=ok, other=-1).to(tl.int64)
        live = ok & (e >= 0)
        safe = tl.where(live, e, 0)
        page = tl.load(table_ptr + seq * stride_table + safe // RPP, mask=live, other=0).to(tl.int64)
        rows = tl.where(live, base + page * RPP + safe % RPP, -1)
        tl.store(out_ptr + t * stride_out + j, rows.to(tl.int32), mask=ok)


def entry_rows(top: torch.Tensor, page_table: torch.Tensor, seq_ids: torch.Tensor, rows_per_page: int, base: int,
               *, backend: Backend = "auto") -> torch.Tensor:
    """Rows `[T, K]` int32 of the selected entries, −1 where top is −1 (module docstring)."""
    if top.dim() != 2 or page_table.dim() != 2 or seq_ids.shape != (top.shape[0],):
        raise ValueError(f"entry_rows: top [T, K], page_table [B, P], seq_ids [T]; got {tuple(top.shape)}, "
                         f"{tuple(page_table.shape)}, {tuple(seq_ids.shape)}")
    if rows_per_page < 1:
        raise ValueError(f"entry_rows: rows_per_page must be ≥ 1, got {rows_per_page}")
    if pick_backend(backend, top, page_table, seq_ids) == "reference":
        return entry_rows_ref(top, page_table, seq_ids, rows_per_page, base)
    out = torch.empty(top.shape, dtype=torch.int32, device=top.device)
    if top.numel() == 0:
        return out
    if top.stride(1) != 1:
        top = top.contiguous()
    if page_table.stride(1) != 1:
        page_table = page_table.contiguous()
    block = min(triton.next_power_of_2(top.shape[1]), 1024)
    _entry_rows_kernel[(top.shape[0],)](top, page_table, seq_ids, out, top.shape[1], top.stride(0),
                                        page_table.stride(0), out.stride(0), int(base), RPP=int(rows_per_page),
                                        BLOCK_K=block, num_warps=4)
    return out


def entry_rows_ref(top: torch.Tensor, page_table: torch.Tensor, seq_ids: torch.Tensor, rows_per_page: int,
                   base: int) -> torch.Tensor:
    """entry_rows in plain PyTorch."""
    e = torch.clamp(top, min=0).long()
    pages = page_table[seq_ids.long()].gather(1, e // rows_per_page)
    rows = base + pages.long() * rows_per_page + e % rows_per_page
    return torch.where(top >= 0, rows, -1).to(torch.int32)
