"""The greedy draw: each row's argmax over the vocabulary, split across the row.

    token[b] = the first index i of max_i logits[b, i]       (torch.argmax: a NaN counts as the largest value, so
                                                               the first NaN's index where a row has one)

`torch.argmax(dim=-1)` reduces a row in one thread block: at batch 128 over V = 129,280 fp32 logits that is 128 blocks
on an H100's 132 SMs, each streaming 517 KB alone (47 µs, about twice the time of reading the 66 MB once). Here the
row is cut into chunks of CHUNK columns, one program a (row, chunk) (4,096 programs at batch 128), each writing its
chunk's (largest value, its first index, first NaN's index); a second launch, one program a row, merges a row's
chunks in column order. Both launches are fixed for given shapes, so they capture into a CUDA graph.

API (`backend` as in kernels/device.py):
    argmax_rows(logits, *, out=None, backend="auto") -> Tensor [B] int64
    argmax_rows_ref(logits, *, out=None): torch.argmax(dim=-1), the CPU path.
logits [B, V] fp32/bf16/fp16 with a contiguous last dim; out None or int64 [B] (written and returned).
Exact: the kernel compares values, it does no arithmetic, so its index equals torch's for every input (ties, ±inf,
NaN, a row of −inf: index 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsepd.kernels.device import Backend, pick_backend

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHUNK = 4096  # columns a program of the first launch
BLOCK = 1024  # columns an iteration
_NONE = 2**31 - 1  # "no index": larger than any column


@triton.jit
def _chunk_max_kernel(x_ptr, val_ptr, idx_ptr, nan_ptr, V, s_x, n_chunks,
                      CHUNK_N: tl.constexpr, BLOCK_N: tl.constexpr, NONE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    best = tl.full((), -float("inf"), tl.float32)
    best_i = tl.full((), NONE, tl.int32)
    nan_i = tl.full((), NONE, tl.int32)
    for start in tl.range(0, CHUNK_N, BLOCK_N):
        cols = chunk * CHUNK_N + start + tl.arange(0, BLOCK_N)
        ok = cols < V
        x = tl.load(x_ptr + row * s_x + cols, mask=ok, other=-float("inf")).to(tl.float32)
        is_nan = x != x
        nan_i = tl.minimum(nan_i, tl.min(tl.where(is_nan & ok, cols, NONE), axis=0))
        x = tl.where(is_nan, -float("inf"), x)
        m = tl.max(x, axis=0)
        i = tl.min(tl.where(ok & (x == m), cols, NONE), axis=0)
        take = (m > best) | ((m == best) & (i < best_i))  # earlier iterations hold smaller columns
        best_i = tl.where(take, i, best_i)
        best = tl.maximum(best, m)
    out = row * n_chunks + chunk
    tl.store(val_ptr + out, best)
    tl.store(idx_ptr + out, best_i)
    tl.store(nan_ptr + out, nan_i)


@triton.jit
def _merge_kernel(val_ptr, idx_ptr, nan_ptr, out_ptr, n_chunks, S_BLOCK: tl.constexpr, NONE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, S_BLOCK)
    ok = s < n_chunks
    v = tl.load(val_ptr + row * n_chunks + s, mask=ok, other=-float("inf"))
    i = tl.load(idx_ptr + row * n_chunks + s, mask=ok, other=NONE)
    n = tl.load(nan_ptr + row * n_chunks + s, mask=ok, other=NONE)
    m = tl.max(v, axis=0)
    best = tl.min(tl.where(ok & (v == m), i, NONE), axis=0)
    first_nan = tl.min(n, axis=0)
    token = tl.where(first_nan < NONE, first_nan, best)
    tl.store(out_ptr + row, token.to(tl.int64))


def _check(logits, out) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.dtype not in _DTYPES:
        raise ValueError(f"logits must be an fp32/bf16/fp16 [B, V] tensor, got "
                         f"{getattr(logits, 'dtype', type(logits).__name__)} {tuple(getattr(logits, 'shape', ()))}")
    if logits.shape[1] == 0 or logits.shape[1] >= _NONE:
        raise ValueError(f"logits need 1 ≤ V < 2^31 columns, got {logits.shape[1]}")
    if logits.stride(-1) != 1:
        raise ValueError(f"logits need a contiguous last dim, got strides {logits.stride()}")
    if out is not None and (not isinstance(out, torch.Tensor) or out.shape != (logits.shape[0],)
                            or out.dtype != torch.int64 or out.device != logits.device):
        raise ValueError(f"out must be int64 [{logits.shape[0]}] on {logits.device}, got "
                         f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}")


def argmax_rows(logits: torch.Tensor, *, out: torch.Tensor | None = None, backend: Backend = "auto") -> torch.Tensor:
    """Each row's first index of its largest value (module doc), int64 [B]."""
    _check(logits, out)
    if pick_backend(backend, logits, *(() if out is None else (out,))) == "reference":
        return argmax_rows_ref(logits, out=out)
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.int64, device=logits.device) if out is None else out
    if B == 0:
        return out
    chunk = min(CHUNK, max(BLOCK, triton.next_power_of_2(V)))
    n_chunks = triton.cdiv(V, chunk)
    val = torch.empty((B, n_chunks), dtype=torch.float32, device=logits.device)
    idx = torch.empty((B, n_chunks), dtype=torch.int32, device=logits.device)
    nan = torch.empty((B, n_chunks), dtype=torch.int32, device=logits.device)
    _chunk_max_kernel[(B, n_chunks)](logits, val, idx, nan, V, logits.stride(0), n_chunks,
                                     CHUNK_N=chunk, BLOCK_N=min(BLOCK, chunk), NONE=_NONE, num_warps=4)
    _merge_kernel[(B,)](val, idx, nan, out, n_chunks, S_BLOCK=max(16, triton.next_power_of_2(n_chunks)), NONE=_NONE,
                        num_warps=1)
    return out


def argmax_rows_ref(logits: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """torch.argmax over the last dim."""
    tokens = logits.argmax(-1)
    return tokens if out is None else out.copy_(tokens)
