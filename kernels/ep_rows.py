"""The rows an expert-parallel MoE layer exchanges (model/expert_parallel.py; docs/DESIGN.md §9 "Multi-GPU").

With W ranks, rank p holding experts [p·per_rank, (p+1)·per_rank), and n tokens on this rank, each with k expert
ids and k routing weights:

    send [W·n, row_bytes] uint8: W blocks of n rows; block p holds, in token order, the tokens with at least one
         expert on p (rows 0 … c_p − 1), then padding (rows c_p … n − 1).
    row  = x_t's bytes (dim · x.element_size()) | the k ids local to p, id − p·per_rank, or −1 for a slot another
           rank serves (int32) | the k routing weights (fp32) | zeros to a multiple of 64 bytes; a padding row is
           zeros with ids −1. (The 64 bytes keep every field's row stride a multiple of 16 elements, which Triton's
           launcher specializes on: the expert kernels' loads of x from the received rows stay vectorized.)
    pos  [W, n] int32: the row of token t in block p, −1 when t sends nothing to p.
    combine: y[t] = Σ_p back[p·n + pos[p, t]] over the ranks in order ((b_0 + b_1) + b_2 …), an unsent rank's term
             +0.0; fp32 [n, dim]. With W = 1, y[t] is the row itself (bit for bit).

`pack_ep_rows` is one launch, grid (blocks of rows, W): program (b, p) owns rows j ∈ [b·BLOCK_T, (b+1)·BLOCK_T) of
block p and pos[p, j] of the same tokens. One pass over the n·k ids (they stay in L2: 12 KB at n = 256, k = 6) gives
each sent token's row by a running cumsum, so the program finds the token of each of its rows (none: padding) and
the count before its tokens; it then writes its rows as one contiguous run (a gather of x rows). Every byte of send
is written once, so nothing is zero-filled first. (Placing the tokens from the source side instead, stores to
scattered rows plus the padding rows, spilled 24-45 SGPRs on gfx942/gfx950.) `combine_ep_rows` is one
launch, grid (token blocks, dim blocks). Both are sync-free with shapes that depend on (n, W, k, dim) only, so a
CUDA graph captures them. `ep_row_fields` views a received buffer as the expert kernels' inputs (x, int32 ids,
weights) without copies. The torch references (`pack_ep_rows_ref`, `combine_ep_rows_ref`: ~30 and W + 4 small ops;
bench/ep_op_count.py counts them)
give the same bytes and the same sums; they are the CPU path.

Supported: x bf16 / fp16 / fp32 with dim · element_size a multiple of 4 and unit last stride (its rows are copied as
32-bit words, so any bits travel unchanged), weights fp32, indices int32 / int64 in [0, W·per_rank) (not checked:
that needs a host sync), any strides for weights and indices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsepd.kernels.device import Backend, pick_backend

_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


ROW_ALIGN = 64  # bytes


def ep_row_bytes(dim: int, dtype: torch.dtype, k: int) -> int:
    """Bytes of one exchanged row: x, k int32 ids, k fp32 weights, zeros to a multiple of ROW_ALIGN."""
    return -(-(dim * dtype.itemsize + 8 * k) // ROW_ALIGN) * ROW_ALIGN


def ep_row_fields(rows: torch.Tensor, dim: int, dtype: torch.dtype, k: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views (no copies) of received rows `[R, row_bytes]` uint8: x `[R, dim]` dtype, local ids `[R, k]` int32,
    weights `[R, k]` fp32, each with the row as its first stride."""
    x_bytes = dim * dtype.itemsize
    if rows.dim() != 2 or rows.dtype != torch.uint8 or rows.shape[1] != ep_row_bytes(dim, dtype, k):
        raise ValueError(f"rows must be uint8 [R, {ep_row_bytes(dim, dtype, k)}], got {rows.dtype} {list(rows.shape)}")
    return (rows[:, :x_bytes].view(dtype), rows[:, x_bytes:x_bytes + 4 * k].view(torch.int32),
            rows[:, x_bytes + 4 * k:x_bytes + 8 * k].view(torch.float32))


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def _check_pack(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, world_size: int,
                per_rank: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in _X_DTYPES:
        raise ValueError(f"x must be a bf16/fp16/fp32 [n, dim] tensor, got {getattr(x, 'dtype', x)} "
                         f"{list(getattr(x, 'shape', ()))}")
    n, dim = x.shape
    if (dim * x.element_size()) % 4:
        raise ValueError(f"x rows must be a multiple of 4 bytes, got dim {dim} of {x.dtype}")
    if indices.dim() != 2 or indices.shape[0] != n or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32/int64 [n={n}, k], got {indices.dtype} {list(indices.shape)}")
    if tuple(weights.shape) != tuple(indices.shape) or weights.dtype != torch.float32:
        raise ValueError(f"weights must be fp32 {list(indices.shape)}, got {weights.dtype} {list(weights.shape)}")
    if world_size < 1 or per_rank < 1:
        raise ValueError(f"world_size and per_rank must be >= 1, got {world_size}, {per_rank}")
    for name, t in (("weights", weights), ("indices", indices)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")


# --- kernels ------------------------------------------------------------------------------------
@triton.jit
def _pack_kernel(
    x_ptr, w_ptr, idx_ptr, send_ptr, pos_ptr,  # x and send as int32 words; weights fp32; pos int32 [W, n]
    n, k, per_rank, x_words, row_words, stride_xt, stride_wt, stride_wk, stride_it, stride_ik,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr, SCAN: tl.constexpr, TAIL: tl.constexpr,
):
    p = tl.program_id(1)
    lo = p * per_rank
    first = tl.program_id(0) * BLOCK_T
    j = first + tl.arange(0, BLOCK_T)  # this program's tokens (for pos) and rows of block p (for send)
    j_ok = j < n
    offs_k = tl.arange(0, K_PAD)
    k_ok = offs_k < k
    # one pass over the ids: the token whose row is j (`src`, -1: padding), the tokens sent before `first`
    src = tl.full((BLOCK_T,), -1, tl.int32)
    sent_before = tl.zeros((), tl.int32)
    seen = tl.zeros((), tl.int32)  # tokens sent to p before the chunk
    for c in range(0, n, SCAN):
        t = c + tl.arange(0, SCAN)
        ids = tl.load(idx_ptr + t[:, None].to(tl.int64) * stride_it + offs_k[None, :] * stride_ik,
                      mask=(t < n)[:, None] & k_ok[None, :], other=-1)
        sent = tl.max(((ids >= lo) & (ids < lo + per_rank)).to(tl.int32), axis=1)  # [SCAN]
        row = seen + tl.cumsum(sent, axis=0) - 1  # [SCAN]: the token's row where sent
        match = (row[None, :] == j[:, None]) & (sent[None, :] > 0)  # [BLOCK_T, SCAN]
        src = tl.maximum(src, tl.max(tl.where(match, t[None, :], -1), axis=1))
        sent_before += tl.sum(tl.where(t < first, sent, 0), axis=0)
        seen += tl.sum(sent, axis=0)
    # pos of this program's tokens
    j64 = j.to(tl.int64)
    ids = tl.load(idx_ptr + j64[:, None] * stride_it + offs_k[None, :] * stride_ik,
                  mask=j_ok[:, None] & k_ok[None, :], other=-1)
    sent = tl.max(((ids >= lo) & (ids < lo + per_rank)).to(tl.int32), axis=1)  # [BLOCK_T]
    tl.store(pos_ptr + p * n + j, tl.where(sent > 0, sent_before + tl.cumsum(sent, axis=0) - 1, -1), mask=j_ok)
    # rows j of block p: a contiguous run of send, from token src (zeros and ids -1 where padding)
    has = src >= 0
    src64 = tl.where(has, src, 0).to(tl.int64)
    dest = (p * n + j).to(tl.int64) * row_words  # [BLOCK_T] first word of row j
    for d0 in range(0, x_words, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < x_words
        words = tl.load(x_ptr + src64[:, None] * stride_xt + offs_d[None, :], mask=has[:, None] & d_ok[None, :],
                        other=0)
        tl.store(send_ptr + dest[:, None] + offs_d[None, :], words, mask=j_ok[:, None] & d_ok[None, :])
    src_k = has[:, None] & k_ok[None, :]
    ids = tl.load(idx_ptr + src64[:, None] * stride_it + offs_k[None, :] * stride_ik, mask=src_k, other=-1)
    local = tl.where((ids >= lo) & (ids < lo + per_rank), ids - lo, -1).to(tl.int32)
    w = tl.load(w_ptr + src64[:, None] * stride_wt + offs_k[None, :] * stride_wk, mask=src_k, other=0.0)
    row_k = j_ok[:, None] & k_ok[None, :]
    tl.store(send_ptr + dest[:, None] + x_words + offs_k[None, :], local, mask=row_k)
    tl.store(send_ptr + dest[:, None] + x_words + k + offs_k[None, :], w.to(tl.int32, bitcast=True), mask=row_k)
    offs_tail = x_words + 2 * k + tl.arange(0, TAIL)  # the row's zeros up to ROW_ALIGN
    tl.store(send_ptr + dest[:, None] + offs_tail[None, :], tl.zeros((BLOCK_T, TAIL), tl.int32),
             mask=j_ok[:, None] & (offs_tail < row_words)[None, :])


@triton.jit
def _combine_kernel(back_ptr, pos_ptr, out_ptr, n, dim, world_size, stride_b, stride_o,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = t < n
    d_ok = offs_d < dim
    row = tl.load(pos_ptr + t, mask=t_ok, other=-1)  # rank 0's block starts at row 0
    acc = tl.load(back_ptr + row.to(tl.int64)[:, None] * stride_b + offs_d[None, :],
                  mask=(row >= 0)[:, None] & d_ok[None, :], other=0.0)
    for p in range(1, world_size):  # in rank order, as combine_ep_rows_ref adds
        row = tl.load(pos_ptr + p * n + t, mask=t_ok, other=-1)
        acc += tl.load(back_ptr + (p * n + row).to(tl.int64)[:, None] * stride_b + offs_d[None, :],
                       mask=(row >= 0)[:, None] & d_ok[None, :], other=0.0)
    tl.store(out_ptr + t.to(tl.int64)[:, None] * stride_o + offs_d[None, :], acc, mask=t_ok[:, None] & d_ok[None, :])


# --- public API ---------------------------------------------------------------------------------
def _pack_tiles(n: int, x_words: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_D, SCAN, num_warps): 16 rows a program for decode-sized n, 64 beyond (fewer programs repeat
    the count); tiles of 4096 words, [BLOCK_T, SCAN] matches of 4096; 8 warps (at 4, 10 SGPRs spilled on gfx942 and
    gfx950 for n = 2 … 8)."""
    block_t = 16 if n <= 1024 else 64
    return block_t, min(4096 // block_t, triton.next_power_of_2(x_words)), 4096 // block_t, 8


def pack_ep_rows(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, world_size: int, per_rank: int,
                 *, backend: Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The send buffer `[W·n, row_bytes]` uint8 and the rows `pos [W, n]` int32 of x `[n, dim]`, weights `[n, k]`
    fp32 and expert ids `indices [n, k]` (module docstring); no host sync on Triton."""
    _check_pack(x, weights, indices, world_size, per_rank)
    if pick_backend(backend, x, weights, indices) == "reference":
        return pack_ep_rows_ref(x, weights, indices, world_size, per_rank)
    if x.stride(1) != 1:
        raise ValueError(f"x needs a unit last stride, got strides {x.stride()}")
    (n, dim), k = x.shape, indices.shape[1]
    words = x.view(torch.int32)  # [n, x_words]
    row_words = ep_row_bytes(dim, x.dtype, k) // 4
    send = _empty((world_size * n, row_words * 4), torch.uint8, x.device)
    pos = _empty((world_size, n), torch.int32, x.device)
    if n == 0:
        return send, pos
    block_t, block_d, scan, num_warps = _pack_tiles(n, words.shape[1])
    _pack_kernel[(triton.cdiv(n, block_t), world_size)](
        words, weights, indices, send.view(torch.int32), pos,
        n, k, per_rank, words.shape[1], row_words, words.stride(0), weights.stride(0), weights.stride(1),
        indices.stride(0), indices.stride(1),
        BLOCK_T=block_t, BLOCK_D=block_d, K_PAD=max(2, triton.next_power_of_2(k)), SCAN=scan, TAIL=ROW_ALIGN // 4,
        num_warps=num_warps,
    )
    return send, pos


def pack_ep_rows_ref(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, world_size: int,
                     per_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch, the same bytes and rows (sync-free too, ~30 small ops)."""
    _check_pack(x, weights, indices, world_size, per_rank)
    W, per, (n, dim), k = world_size, per_rank, x.shape, indices.shape[1]
    device = x.device
    rank_of = indices.long() // per  # [n, k]
    to_rank = torch.zeros(n, W, dtype=torch.bool, device=device).scatter_(1, rank_of, True)  # [n, W]
    pos = torch.where(to_rank, torch.cumsum(to_rank.to(torch.int64), 0) - 1, -1)  # [n, W]
    # row of token t in the send buffer, W·n (one past the end) for tokens not sent to p
    row = torch.where(to_rank, pos + torch.arange(W, device=device) * n, W * n).t().reshape(-1)  # [W·n], block-major
    x_bytes = dim * x.element_size()
    send = torch.zeros(W * n + 1, ep_row_bytes(dim, x.dtype, k), dtype=torch.uint8, device=device)  # last: not sent
    send[:, x_bytes:x_bytes + 4 * k] = 255  # int32 -1 on padding rows: they compute nothing
    ranks = torch.arange(W, device=device)[:, None, None]  # [W, 1, 1]
    local_ids = torch.where(rank_of[None] == ranks, indices[None].long() - ranks * per, -1).to(torch.int32)  # [W,n,k]
    rows = torch.cat([x.contiguous().view(torch.uint8).repeat(W, 1),
                      local_ids.reshape(W * n, k).view(torch.uint8),
                      weights.float().repeat(W, 1).view(torch.uint8)], 1)  # [W·n, bytes]
    send[:, :rows.shape[1]].index_copy_(0, row, rows)
    return send[:-1], pos.t().to(torch.int32).contiguous()


def _check_combine(back: torch.Tensor, pos: torch.Tensor) -> None:
    if pos.dim() != 2 or pos.dtype != torch.int32:
        raise ValueError(f"pos must be int32 [W, n], got {pos.dtype} {list(pos.shape)}")
    W, n = pos.shape
    if back.dim() != 2 or back.shape[0] != W * n or back.dtype != torch.float32:
        raise ValueError(f"back must be fp32 [W·n={W * n}, dim], got {back.dtype} {list(back.shape)}")
    if back.device != pos.device:
        raise ValueError(f"back is on {back.device}, pos on {pos.device}")


def combine_ep_rows(back: torch.Tensor, pos: torch.Tensor, *, backend: Backend = "auto") -> torch.Tensor:
    """Σ over the ranks, in rank order, of each token's returned rows: `back [W·n, dim]` fp32 (block p: the rows
    this rank sent to p, computed there), `pos [W, n]` from `pack_ep_rows` → fp32 `[n, dim]`."""
    _check_combine(back, pos)
    if pick_backend(backend, back, pos) == "reference":
        return combine_ep_rows_ref(back, pos)
    if back.stride(1) != 1 or not pos.is_contiguous():
        raise ValueError(f"back needs a unit last stride and pos contiguous, got strides {back.stride()}, "
                         f"{pos.stride()}")
    (W, n), dim = pos.shape, back.shape[1]
    out = _empty((n, dim), torch.float32, back.device)
    if n == 0:
        return out
    block_t, block_d = 16, min(256, triton.next_power_of_2(dim))
    _combine_kernel[(triton.cdiv(n, block_t), triton.cdiv(dim, block_d))](
        back, pos, out, n, dim, W, back.stride(0), out.stride(0), BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )
    return out


def combine_ep_rows_ref(back: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: the same sums in the same order (exact equality with the kernel)."""
    _check_combine(back, pos)
    (W, n), dim = pos.shape, back.shape[1]
    rows = torch.cat([back, back.new_zeros(1, dim)])  # the row of "not sent": +0.0
    at = torch.where(pos >= 0, pos.long() + torch.arange(W, device=pos.device)[:, None] * n, W * n)  # [W, n]
    out = rows[at[0]]
    for p in range(1, W):
        out += rows[at[p]]
    return out
