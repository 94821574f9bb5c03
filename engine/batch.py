"""Batch metadata, built once per forward and shared by every layer (docs/DESIGN.md §8).

A forward is a ragged batch: request b contributes n_b new tokens at positions start_b … start_b+n_b−1
(a prefill chunk, or one decode token). Everything a layer needs to find keys is precomputed here as
tensors on the device: token→request map, positions, page tables, each token's window rows in the
unified per-layer buffer (engine/pools.py), each compress ratio's plans and visible-entry counts, the
HCA rows, and where the SWA rings are written. No layer does host work or syncs.

The fields are first built on the host (`host_fields`, a name → CPU tensor table). An eager forward moves
them to the device as they are; a CUDA-graph step builds them padded to a fixed `BatchShape` (the graph's
batch bucket, tokens per request and page-table width) and copies them into the graph's static buffers at
once (engine/graphs.py, engine/spec_graphs.py). The real tokens are packed first, exactly as in the eager
layout (request after request, however many each brings, up to the shape's tokens per request), and padding
fills the tail: tokens up to batch × tokens per request, requests up to batch. Padding is inert: padded tokens
see no keys (window rows −1, nothing visible), their plan rows are −1 (kernels skip them), so they write
nothing that a real request reads.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from sparsepd.engine.pools import PoolGeometry
from sparsepd.kernels.compress_plan import CompressPlan, RowPlan, build_compress_plan, build_write_plan


# Not frozen: one is made for every request of every forward, and a frozen __init__ sets each field through
# object.__setattr__ (5 calls a request). Nothing changes one once made.
@dataclass(slots=True)
class RequestChunk:
    """One request's part of a forward."""

    slot: int
    start: int  # position of the first new token
    token_ids: list[int]
    page_table: list[int]
    # prefix-cache boundary snapshots this forward takes (engine/prefix_cache.py): (boundary p, snapshot slot);
    # the ring writes of the positions before p also go to that slot (`capture_rows`)
    captures: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class BatchShape:
    """The fixed shape of a padded batch (one CUDA graph): `batch` requests of at most `tokens_per_request`
    tokens each, packed into `tokens` = batch × tokens_per_request rows (1 for a decode step, k + 1 for a
    speculative verification: engine/spec_graphs.py)."""

    batch: int
    pages: int  # page-table width
    tokens_per_request: int = 1

    @property
    def tokens(self) -> int:
        return self.batch * self.tokens_per_request


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


def check_chunks(chunks: list[RequestChunk], geometry: PoolGeometry, vocab_size: int) -> None:
    """Host-side checks of a forward's input (so the forward itself never syncs to check)."""
    # (map over the chunks' lists: a few calls a step, not a few a request)
    ids = [c.token_ids for c in chunks if c.token_ids]
    num_tokens = sum(map(len, ids))
    if num_tokens > geometry.max_batch_tokens:
        raise ValueError(f"{num_tokens} tokens exceed max_batch_tokens={geometry.max_batch_tokens}")
    # −1 is PENDING (engine/request.py): a token the runner takes from the device
    lo, hi = min(map(min, ids), default=0), max(map(max, ids), default=0)
    if lo < -1 or hi >= vocab_size:  # (the error path only: name the first offending token and its request)
        slot, index, token = next((c.slot, j, t) for c in chunks for j, t in enumerate(c.token_ids)
                                  if t < -1 or t >= vocab_size)
        raise ValueError(f"token ids must lie in the vocabulary [0, {vocab_size}): token {token} at position "
                         f"{index} of the chunk in slot {slot} (the step's ids range over {lo} … {hi})")


def host_fields(chunks: list[RequestChunk], geometry: PoolGeometry,
                shape: BatchShape | None = None) -> dict[str, torch.Tensor]:
    """Every field of a forward as CPU tensors; padded to `shape` when given (chunks of 1 … tokens_per_request
    tokens each)."""
    n = torch.tensor([len(c.token_ids) for c in chunks], dtype=torch.int64)
    if shape is not None and (len(chunks) > shape.batch or bool(((n < 1) | (n > shape.tokens_per_request)).any())):
        raise ValueError(f"a {shape} batch holds at most {shape.batch} chunks of 1 … {shape.tokens_per_request} "
                         "tokens")
    starts = torch.tensor([c.start for c in chunks], dtype=torch.int64)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), n.cumsum(0)])
    num_tokens = int(cu[-1])
    seq = torch.from_numpy(np.repeat(np.arange(len(chunks)), n.numpy()))  # (torch's CPU repeat_interleave is slow)
    positions = starts[seq] + torch.arange(num_tokens) - cu[seq]
    slots = torch.tensor([c.slot for c in chunks], dtype=torch.int64)
    page_table = torch.from_numpy(_page_table(chunks, None if shape is None else shape.pages))
    width = page_table.shape[1]

    # In int32 and with one where: [T, win] temporaries are most of a prefill chunk's host time (at 2048 tokens,
    # 10.7 ms with int64 and two wheres vs 1.3–4.3 ms on this 2-core CPU).
    win = geometry.window
    offsets = torch.arange(-(win - 1), 1, dtype=torch.int32)  # [win]
    keys = positions.to(torch.int32)[:, None] + offsets  # [T, win]
    # this forward's rows: cu_b + key − start_b = the token's row + offset
    scratch_rows = torch.arange(num_tokens, dtype=torch.int32)[:, None] + offsets
    ring_rows = (geometry.ring_base + slots.to(torch.int32)[seq] * win)[:, None] + keys.remainder(win)
    window_rows = torch.where(keys < starts.to(torch.int32)[seq][:, None], ring_rows, scratch_rows)
    window_rows.masked_fill_(keys < 0, -1)

    capacity = None if shape is None else shape.tokens  # plan rows: at most one commit and one ring row a token
    captures = [(b, p, s) for b, c in enumerate(chunks) for p, s in c.captures]
    if captures and shape is not None:
        raise ValueError("boundary snapshots are taken in eager forwards only")
    swa = build_write_plan(starts, n, win, capacity=capacity)
    token_ids = np.fromiter(itertools.chain.from_iterable([c.token_ids for c in chunks]), dtype=np.int64,
                            count=num_tokens)  # (no Python loop over a prefill chunk's thousands of tokens)
    f = {"token_ids": torch.from_numpy(token_ids),
         "positions": positions, "seq_ids": seq.to(torch.int32), "slots": slots, "page_table": page_table,
         "window_rows": window_rows, "swa_rows": capture_rows(swa.rows, captures, starts, cu, win),
         "swa_cu": swa.cu, "last_rows": cu[1:] - 1}
    if captures:  # the snapshot slots ride as extra batch ids past the requests' (no token, no page read)
        f["slots"] = torch.cat([slots, torch.tensor([s for _, _, s in captures], dtype=torch.int64)])
        f["page_table"] = torch.cat([page_table, page_table.new_zeros(len(captures), width)])
    for ratio in sorted({r for r in geometry.ratios if r}):
        rpp = geometry.rows_per_page(ratio)
        visible = torch.div(positions + 1, ratio, rounding_mode="floor")
        plan = build_compress_plan(starts, n, ratio, ratio == 4, capacity=capacity, write_capacity=capacity)
        f[f"r{ratio}.visible"] = visible.to(torch.int32)
        f[f"r{ratio}.commit_rows"], f[f"r{ratio}.commit_cu"] = plan.commit.rows, plan.commit.cu
        f[f"r{ratio}.write_rows"] = capture_rows(plan.write.rows, captures, starts, cu, plan.state_size)
        f[f"r{ratio}.write_cu"] = plan.write.cu
        if ratio != 4:
            hca_width = max(int(visible.max()) if num_tokens else 1, 1) if shape is None else width * rpp
            entries = torch.arange(hca_width, dtype=torch.int32)  # (int32 throughout: the rows are int32)
            pages = page_table[seq][:, torch.clamp(entries // rpp, max=page_table.shape[1] - 1)]  # [T, hca_width]
            rows = (pages * rpp).add_(geometry.compressed_base).add_(entries % rpp)
            f[f"r{ratio}.hca_rows"] = rows.masked_fill_(entries[None, :] >= visible[:, None], -1)
    return f if shape is None else _pad(f, len(chunks), num_tokens, shape)


def _page_table(chunks: list[RequestChunk], width: int | None) -> np.ndarray:
    """The chunks' page tables `[B, width]` int32, 0-padded (width None: the longest table's, at least 1), written
    with one masked write of the concatenated tables (row-major, as the mask is read): not a write per request
    (a torch.tensor and a copy each, ~5 µs, for every request of every eager forward)."""
    tables = [c.page_table for c in chunks]
    lengths = np.array(list(map(len, tables)), dtype=np.int64).reshape(len(chunks))
    longest = int(lengths.max()) if len(chunks) else 0
    width = max(longest, 1) if width is None else width
    if longest > width:
        raise ValueError(f"request with {longest} pages does not fit a {width}-page batch")
    table = np.zeros((len(chunks), width), dtype=np.int32)
    table[np.arange(width) < lengths[:, None]] = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32,
                                                              count=int(lengths.sum()))
    return table


def capture_rows(rows: torch.Tensor, captures: list[tuple[int, int, int]], starts: torch.Tensor, cu: torch.Tensor,
                 size: int) -> torch.Tensor:
    """A ring-write plan's rows plus those of the boundary snapshots: for a snapshot of request b at boundary p
    into snapshot slot s (batch id B + its index, `slots` extended with s), the positions [max(start_b, p − size),
    p) written to s's ring at position % size, so that s holds the ring as it was at p (the rows before start_b
    were copied into s before the forward: engine/prefix_restore.py)."""
    if not captures:
        return rows
    num_requests, extra = starts.shape[0], []
    for j, (b, p, _) in enumerate(captures):
        start = int(starts[b])
        pos = torch.arange(max(start, p - size), p, dtype=torch.int64)
        extra.append(torch.stack([int(cu[b]) + pos - start, torch.full_like(pos, num_requests + j), pos, pos % size],
                                 dim=1))
    return torch.cat([rows, torch.cat(extra).to(rows.dtype)])


def decode_fields_into(chunks: list[RequestChunk], geometry: PoolGeometry, shape: BatchShape,
                       out: dict[str, np.ndarray]) -> None:
    """`host_fields(chunks, geometry, shape)` for one-token chunks, written in place into `out` (numpy views of
    the graph's pinned buffer, engine/graphs.py): the same values, in closed form with a few numpy operations,
    because each small torch op on the host costs microseconds and a decode step's host work is on the
    critical path (tests/engine/test_graphs.py checks both builders agree)."""
    B, Bp, win, P = len(chunks), shape.batch, geometry.window, shape.pages
    if B > Bp:
        raise ValueError(f"a {shape} batch holds at most {shape.batch} one-token chunks")
    # (lists, then one array each: a generator would be resumed once a request)
    pos = np.array([c.start for c in chunks], dtype=np.int64).reshape(B)
    slots = np.array([c.slot for c in chunks], dtype=np.int64).reshape(B)
    for name in ("token_ids", "positions", "seq_ids", "slots", "page_table"):
        out[name][B:] = 0
    out["token_ids"][:B] = [c.token_ids[0] for c in chunks]
    out["positions"][:B] = pos
    out["seq_ids"][:B] = np.arange(B)
    out["slots"][:B] = slots
    out["last_rows"][:] = np.arange(Bp)
    table = out["page_table"]
    table[:B] = _page_table(chunks, P)  # (not a numpy write per request: 0.3 µs each, 128 a step)
    # window rows [B, win]: key j is pos − (win − 1) + j, in ring row (pos + 1 + j) mod win (take's "wrap" mode
    # does the modulo), the last key is this step's token (scratch row b), keys before position 0 are −1: in
    # int32 and in place, not in [B, win] int64 temporaries (bench/RESULTS.md, the decode worker's per-step host work)
    rows = out["window_rows"][:B]
    start = (pos + 1) % win
    np.take(np.arange(win, dtype=np.int32), start[:, None] + np.arange(win), out=rows, mode="wrap")
    rows += (geometry.ring_base + slots * win).astype(np.int32)[:, None]
    rows[:, -1] = np.arange(B)
    young = (pos < win - 1).nonzero()[0]  # requests whose window starts before position 0
    if young.shape[0]:
        rows[young] = np.where(np.arange(win) >= (win - 1 - pos[young])[:, None], rows[young], -1)
    out["window_rows"][B:] = -1
    arange = np.arange(B)
    _plan_rows(out["swa_rows"], out["swa_cu"], None, (arange, arange, pos, pos % win), B, Bp)
    for ratio in sorted({r for r in geometry.ratios if r}):
        p, size = f"r{ratio}.", (2 if ratio == 4 else 1) * ratio
        visible = (pos + 1) // ratio
        out[p + "visible"][:B], out[p + "visible"][B:] = visible, 0
        commits = ((pos + 1) % ratio == 0).nonzero()[0]
        cpos = pos[commits]
        _plan_rows(out[p + "commit_rows"], out[p + "commit_cu"], commits,
                   (commits, commits, cpos, np.minimum(cpos, size - 1)), B, Bp)
        _plan_rows(out[p + "write_rows"], out[p + "write_cu"], None, (arange, arange, pos, pos % size), B, Bp)
        if ratio != 4:
            rpp = geometry.rows_per_page(ratio)
            entries = np.arange(P * rpp)
            hca = geometry.compressed_base + table[:B, entries // rpp].astype(np.int64) * rpp + entries % rpp
            out[p + "hca_rows"][:B] = np.where(entries[None, :] < visible[:, None], hca, -1)
            out[p + "hca_rows"][B:] = -1


def packed_fields_into(chunks: list[RequestChunk], geometry: PoolGeometry, shape: BatchShape,
                       out: dict[str, np.ndarray]) -> None:
    """`host_fields(chunks, geometry, shape)` for chunks of 1 … shape.tokens_per_request tokens, no snapshots, and
    tokens_per_request ≤ every ring (the window and each compressor's state size: a speculative step's k + 1, which
    engine/undo.py `max_span` bounds, so every token of a chunk is in its write plans), written in place into `out`
    with a few numpy operations, as `decode_fields_into` does for one token each (tests/engine/test_spec_graphs.py
    checks both builders agree)."""
    B, Bp, win, P, q = len(chunks), shape.batch, geometry.window, shape.pages, shape.tokens_per_request
    counts = np.fromiter((len(c.token_ids) for c in chunks), dtype=np.int64, count=B)
    if B > Bp or (B and (counts.min() < 1 or counts.max() > q)):
        raise ValueError(f"a {shape} batch holds at most {shape.batch} chunks of 1 … {q} tokens")
    sizes = [win] + [(2 if r == 4 else 1) * r for r in geometry.ratios if r]
    if q > min(sizes):
        raise ValueError(f"{q} tokens per request exceed the smallest ring ({min(sizes)})")
    T = int(counts.sum())
    starts = np.fromiter((c.start for c in chunks), dtype=np.int64, count=B)
    slots = np.fromiter((c.slot for c in chunks), dtype=np.int64, count=B)
    cu = np.zeros(B + 1, dtype=np.int64)
    np.cumsum(counts, out=cu[1:])
    seq = np.repeat(np.arange(B), counts)
    t = np.arange(T)
    pos = starts[seq] + t - cu[seq]
    for name in ("token_ids", "positions", "seq_ids"):
        out[name][T:] = 0
    out["token_ids"][:T] = [x for c in chunks for x in c.token_ids]
    out["positions"][:T] = pos
    out["seq_ids"][:T] = seq
    out["slots"][:B], out["slots"][B:] = slots, 0
    out["last_rows"][:B], out["last_rows"][B:] = cu[1:] - 1, T + np.arange(Bp - B)
    table = out["page_table"]
    table[:] = 0
    for b, c in enumerate(chunks):
        if len(c.page_table) > P:
            raise ValueError(f"request with {len(c.page_table)} pages does not fit a {P}-page batch")
        table[b, : len(c.page_table)] = c.page_table
    keys = pos[:, None] - (win - 1) + np.arange(win)  # [T, win]
    first = starts[seq][:, None]
    rows = np.where(keys >= first, cu[seq][:, None] + keys - first, geometry.ring_base + slots[seq][:, None] * win
                    + keys % win)
    out["window_rows"][:T] = np.where(keys >= 0, rows, -1)
    out["window_rows"][T:] = -1
    _plan_rows(out["swa_rows"], out["swa_cu"], seq, (t, seq, pos, pos % win), B, Bp, cu=cu)
    for ratio in sorted({r for r in geometry.ratios if r}):
        p, size = f"r{ratio}.", (2 if ratio == 4 else 1) * ratio
        visible = (pos + 1) // ratio
        out[p + "visible"][:T], out[p + "visible"][T:] = visible, 0
        commits = ((pos + 1) % ratio == 0).nonzero()[0]
        cpos, cseq = pos[commits], seq[commits]
        window_len = np.maximum(np.minimum(starts[cseq], cpos + 1) - np.maximum(cpos - size + 1, 0), 0)
        _plan_rows(out[p + "commit_rows"], out[p + "commit_cu"], cseq,
                   (commits, cseq, cpos, window_len), B, Bp)
        _plan_rows(out[p + "write_rows"], out[p + "write_cu"], seq, (t, seq, pos, pos % size), B, Bp, cu=cu)
        if ratio != 4:
            rpp = geometry.rows_per_page(ratio)
            entries = np.arange(P * rpp)
            hca = geometry.compressed_base + table[seq][:, entries // rpp].astype(np.int64) * rpp + entries % rpp
            out[p + "hca_rows"][:T] = np.where(entries[None, :] < visible[:, None], hca, -1)
            out[p + "hca_rows"][T:] = -1


def _plan_rows(rows_out: np.ndarray, cu_out: np.ndarray, owners: np.ndarray | None,
               columns: tuple[np.ndarray, ...], B: int, Bp: int, cu: np.ndarray | None = None) -> None:
    """A plan of rows whose columns are `columns` (a row per owner request, owners ascending; None: one row per
    request, in order), −1 past them; cu over B requests, padded (`cu`: the owners' cu [B + 1] when the caller has
    it, e.g. a row per token). Written column by column and with ndarray methods: numpy's module functions (stack,
    cumsum, flatnonzero) go through Python wrappers, each a dozen calls, five plans a step."""
    n = columns[0].shape[0]
    for j, column in enumerate(columns):
        rows_out[:n, j] = column
    rows_out[n:] = -1
    if owners is None:
        cu_out[: B + 1] = np.arange(B + 1)
    elif cu is not None:
        cu_out[: B + 1] = cu
    else:
        cu_out[0] = 0
        np.bincount(owners, minlength=B).cumsum(out=cu_out[1: B + 1])
    cu_out[B + 1:] = n


_PER_REQUEST = {"slots", "page_table"}


def _pad(f: dict[str, torch.Tensor], requests: int, tokens: int, shape: BatchShape) -> dict[str, torch.Tensor]:
    """Pad per-request fields from `requests` to shape.batch rows and per-token fields from `tokens` to
    shape.tokens rows, with inert values."""
    extra = shape.batch - requests
    fill = {"window_rows": -1, "hca_rows": -1, "visible": 0}
    out = {}
    for name, t in f.items():
        key = name.split(".")[-1]
        if key.endswith("_cu"):
            out[name] = torch.cat([t, t[-1:].expand(extra)])  # padded requests own no plan rows
        elif key.endswith("_rows") and key != "window_rows" and key != "hca_rows" and key != "last_rows":
            out[name] = t  # plans already have shape.tokens rows (−1 past the real ones)
        elif key == "last_rows":  # a padded request's "last row" is a padded token of its own
            out[name] = torch.cat([t, tokens + torch.arange(extra, dtype=torch.int64)])
        else:
            rows = (shape.batch if key in _PER_REQUEST else shape.tokens) - t.shape[0]
            pad = t.new_full((rows, *t.shape[1:]), fill.get(key, 0))
            out[name] = torch.cat([t, pad])
    return out


def assemble(f: dict[str, torch.Tensor], geometry: PoolGeometry, chunks: list[RequestChunk]) -> ForwardBatch:
    """The ForwardBatch whose tensors are the given fields (already on the device)."""
    def row_plan(rows: torch.Tensor, cu: torch.Tensor) -> RowPlan:
        return RowPlan(rows, cu, torch.empty(0, dtype=torch.int32), -1)  # host copies unused by the forward

    batch = ForwardBatch(token_ids=f["token_ids"], positions=f["positions"], seq_ids=f["seq_ids"], slots=f["slots"],
                         page_table=f["page_table"], window_rows=f["window_rows"],
                         swa_plan=row_plan(f["swa_rows"], f["swa_cu"]), last_rows=f["last_rows"], chunks=chunks)
    for ratio in sorted({r for r in geometry.ratios if r}):
        p = f"r{ratio}."
        plan = CompressPlan(ratio, ratio == 4, (2 if ratio == 4 else 1) * ratio,
                            row_plan(f[p + "commit_rows"], f[p + "commit_cu"]),
                            row_plan(f[p + "write_rows"], f[p + "write_cu"]))
        batch.ratios[ratio] = RatioMeta(ratio, geometry.rows_per_page(ratio), f[p + "visible"], plan,
                                        f.get(p + "hca_rows"))
    return batch


def build_batch(chunks: list[RequestChunk], geometry: PoolGeometry, device: torch.device) -> ForwardBatch:
    """An eager forward's batch: the host fields moved to `device`."""
    if not chunks:
        raise ValueError("a forward needs at least one request")
    num_tokens = sum(map(len, [c.token_ids for c in chunks]))
    if num_tokens > geometry.max_batch_tokens:
        raise ValueError(f"{num_tokens} tokens exceed max_batch_tokens={geometry.max_batch_tokens}")
    fields = {k: v.to(device, non_blocking=True) for k, v in host_fields(chunks, geometry).items()}
    return assemble(fields, geometry, chunks)
