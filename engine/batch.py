"""Batch metadata, built once per forward and shared by every layer (DESIGN.md §6).

A forward is a ragged batch: request b contributes n_b new tokens at positions start_b … start_b+n_b−1
(a prefill chunk, or one decode token). Everything a layer needs to find keys is precomputed here as
tensors on the device: token→request map, positions, page tables, each token's window rows in the
unified per-layer buffer (engine/pools.py), each compress ratio's plans and visible-entry counts, the
HCA rows, and where the SWA rings are written. No layer does host work or syncs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparsepd.engine.pools import PoolGeometry
from sparsepd.kernels.compress_plan import CompressPlan, RowPlan, build_compress_plan, build_write_plan


@dataclass(frozen=True)
class RequestChunk:
    """One request's part of a forward."""

    slot: int
    start: int  # position of the first new token
    token_ids: list[int]
    page_table: list[int]


@dataclass
class RatioMeta:
    """What every layer of one compress ratio shares."""

    ratio: int
    rows_per_page: int
    visible: torch.Tensor  # [T] int32: committed entries token t may see, (p+1)//ratio
    plan: CompressPlan  # commit rows and ring-write rows, shared by every compressor of this ratio
    hca_rows: torch.Tensor | None = None  # [T, max_visible] int32 rows of every visible entry (HCA), −1 padded


@dataclass
class ForwardBatch:
    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    seq_ids: torch.Tensor  # [T] int32
    cu_seqlens: torch.Tensor  # [B+1] int64
    starts: torch.Tensor  # [B] int64
    num_new: torch.Tensor  # [B] int64
    slots: torch.Tensor  # [B] int64
    page_table: torch.Tensor  # [B, max_pages] int32 (0-padded past a request's pages)
    window_rows: torch.Tensor  # [T, window] int32 rows in every layer's buffer, −1 before position 0
    swa_plan: RowPlan  # each request's last `window` tokens → its SWA ring at position % window
    last_rows: torch.Tensor  # [B] row of each request's last token in this forward
    ratios: dict[int, RatioMeta] = field(default_factory=dict)
    chunks: list[RequestChunk] = field(default_factory=list)  # the host-side description

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


def build_batch(chunks: list[RequestChunk], geometry: PoolGeometry, device: torch.device) -> ForwardBatch:
    if not chunks:
        raise ValueError("a forward needs at least one request")
    n = torch.tensor([len(c.token_ids) for c in chunks], dtype=torch.int64)
    if int(n.sum()) > geometry.max_batch_tokens:
        raise ValueError(f"{int(n.sum())} tokens exceed max_batch_tokens={geometry.max_batch_tokens}")
    starts = torch.tensor([c.start for c in chunks], dtype=torch.int64)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), n.cumsum(0)])
    seq = torch.repeat_interleave(torch.arange(len(chunks)), n)
    positions = starts[seq] + torch.arange(int(cu[-1])) - cu[seq]
    slots = torch.tensor([c.slot for c in chunks], dtype=torch.int64)
    max_pages = max(len(c.page_table) for c in chunks)
    page_table = torch.zeros(len(chunks), max(max_pages, 1), dtype=torch.int32)
    for b, c in enumerate(chunks):
        page_table[b, : len(c.page_table)] = torch.tensor(c.page_table, dtype=torch.int32)

    win = geometry.window
    keys = positions[:, None] - (win - 1) + torch.arange(win)  # [T, win]
    scratch_rows = cu[seq][:, None] + (keys - starts[seq][:, None])  # this forward's rows
    ring_rows = geometry.ring_base + slots[seq][:, None] * win + keys % win
    window_rows = torch.where(keys >= starts[seq][:, None], scratch_rows, ring_rows)
    window_rows = torch.where(keys >= 0, window_rows, -1)

    batch = ForwardBatch(
        token_ids=torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.int64, device=device),
        positions=positions.to(device), seq_ids=seq.to(torch.int32).to(device), cu_seqlens=cu.to(device),
        starts=starts.to(device), num_new=n.to(device), slots=slots.to(device), page_table=page_table.to(device),
        window_rows=window_rows.to(torch.int32).to(device), swa_plan=build_write_plan(starts, n, win, device=device),
        last_rows=(cu[1:] - 1).to(device), chunks=chunks)
    for ratio in sorted({r for r in geometry.ratios if r}):
        batch.ratios[ratio] = _ratio_meta(ratio, geometry, positions, seq, page_table, starts, n, device)
    return batch


def _ratio_meta(ratio: int, g: PoolGeometry, positions: torch.Tensor, seq: torch.Tensor, page_table: torch.Tensor,
                starts: torch.Tensor, n: torch.Tensor, device: torch.device) -> RatioMeta:
    rpp = g.rows_per_page(ratio)
    visible = torch.div(positions + 1, ratio, rounding_mode="floor")
    plan = build_compress_plan(starts, n, ratio, ratio == 4, device=device)
    meta = RatioMeta(ratio, rpp, visible.to(torch.int32).to(device), plan)
    if ratio != 4:
        width = max(int(visible.max()), 1)
        entries = torch.arange(width)
        pages = page_table[seq][:, torch.clamp(entries // rpp, max=page_table.shape[1] - 1)].to(torch.int64)
        rows = g.compressed_base + pages * rpp + entries % rpp
        meta.hca_rows = torch.where(entries[None, :] < visible[:, None], rows, -1).to(torch.int32).to(device)
    return meta
