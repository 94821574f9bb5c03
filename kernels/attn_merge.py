"""Merge of two sparse-attention results over disjoint key sets, the attention sink counted once.

`sparse_attn` (kernels/sparse_attention.py) returns, per token t and head h, out = N / (Z + S) and
lse = log Z, with N = Σ_j e^{s_j} kv[j], Z = Σ_j e^{s_j} over its keys and S = e^{attn_sink[h]}. For two
disjoint key sets A and B computed with the same sink (e.g. the sliding window and the compressed keys):

    out = (out_a (Z_a + S) + out_b (Z_b + S)) / (Z_a + Z_b + S),    lse = log(Z_a + Z_b),

evaluated with the largest of lse_a, lse_b, attn_sink subtracted; −inf lse (no key) is fine on either
side, and a row with no key on both sides gives out = 0, lse = −inf. fp32 math; out keeps out_a's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsepd.kernels.device import Backend, pick_backend


@triton.jit
def _merge_attn_kernel(
    oa_ptr, la_ptr, ob_ptr, lb_ptr, sink_ptr, out_ptr, lse_ptr,
    H, stride_at, stride_ah, stride_bt, stride_bh, stride_ot, stride_oh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < H
    mask = mask_h[:, None] & (offs_d < D)[None, :]
    la = tl.load(la_ptr + t * H + offs_h, mask=mask_h, other=float("-inf"))
    lb = tl.load(lb_ptr + t * H + offs_h, mask=mask_h, other=float("-inf"))
    sink = tl.load(sink_ptr + offs_h, mask=mask_h, other=0.0)
    top = tl.maximum(tl.maximum(la, lb), sink)
    top = tl.where(top == float("-inf"), 0.0, top)
    za = tl.exp(la - top)
    zb = tl.exp(lb - top)
    zs = tl.exp(sink - top)
    den = za + zb + zs
    inv = tl.where(den == 0.0, 0.0, 1.0 / tl.where(den == 0.0, 1.0, den))
    oa = tl.load(oa_ptr + t * stride_at + offs_h[:, None] * stride_ah + offs_d[None, :], mask=mask, other=0.0)
    ob = tl.load(ob_ptr + t * stride_bt + offs_h[:, None] * stride_bh + offs_d[None, :], mask=mask, other=0.0)
    o = oa.to(tl.float32) * ((za + zs) * inv)[:, None] + ob.to(tl.float32) * ((zb + zs) * inv)[:, None]
    tl.store(out_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=mask)
    mx = tl.maximum(la, lb)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    total = tl.exp(la - mx_safe) + tl.exp(lb - mx_safe)
    lse = mx_safe + tl.log(tl.where(total == 0.0, 1.0, total))
    tl.store(lse_ptr + t * H + offs_h, tl.where(mx == float("-inf"), float("-inf"), lse), mask=mask_h)


# ----------------------------------------------------------------------------------------------------
# Checks shared with kernels/sparse_attention.py


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """lse is fp32, except fp64 for the fp64 reference computations of the tests."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_out(name, x, shape, dtype, device) -> None:
    if x is None:
        return
    if tuple(x.shape) != shape or x.dtype != dtype or x.device != device:
        raise ValueError(f"{name} must be {list(shape)} {dtype} on {device}, "
                         f"got {list(x.shape)} {x.dtype} on {x.device}")


# ----------------------------------------------------------------------------------------------------
# merge_attn


def _check_merge_inputs(out_a, lse_a, out_b, lse_b, attn_sink, out, lse) -> None:
    for name, x, dim in (("out_a", out_a, 3), ("lse_a", lse_a, 2), ("out_b", out_b, 3), ("lse_b", lse_b, 2),
                         ("attn_sink", attn_sink, 1)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != dim:
            raise ValueError(f"{name} must have {dim} dims, got shape {tuple(x.shape)}")
    T, H, D = out_a.shape
    for name, x, shape in (("out_b", out_b, (T, H, D)), ("lse_a", lse_a, (T, H)), ("lse_b", lse_b, (T, H)),
                           ("attn_sink", attn_sink, (H,))):
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)} to match out_a, got {list(x.shape)}")
    if out_b.dtype != out_a.dtype or not out_a.dtype.is_floating_point:
        raise TypeError(f"out_a and out_b must share a float dtype, got {out_a.dtype} and {out_b.dtype}")
    for name, x in (("lse_a", lse_a), ("lse_b", lse_b), ("attn_sink", attn_sink)):
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be float32, got {x.dtype}")
    devices = {x.device for x in (out_a, lse_a, out_b, lse_b, attn_sink)}
    if len(devices) != 1:
        raise ValueError(f"merge_attn inputs must be on one device, got {sorted(map(str, devices))}")
    check_out("out", out, (T, H, D), out_a.dtype, out_a.device)
    check_out("lse", lse, (T, H), lse_dtype(out_a.dtype), out_a.device)


def merge_attn(
    out_a: torch.Tensor,  # [T, H, D], from sparse_attn over key set A
    lse_a: torch.Tensor,  # [T, H] fp32
    out_b: torch.Tensor,  # [T, H, D], over key set B (disjoint from A), same sink
    lse_b: torch.Tensor,  # [T, H] fp32
    attn_sink: torch.Tensor,  # [H] fp32
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    *,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two sink-included partial results into the result over A ∪ B (sink counted once)."""
    _check_merge_inputs(out_a, lse_a, out_b, lse_b, attn_sink, out, lse)
    if pick_backend(backend, out_a, lse_a, out_b, lse_b, attn_sink) == "reference":
        return merge_attn_ref(out_a, lse_a, out_b, lse_b, attn_sink, out, lse)
    T, H, D = out_a.shape
    for name, x in (("out_a", out_a), ("out_b", out_b), ("out", out)):
        if x is not None and x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {x.stride()}")
    for name, x in (("lse_a", lse_a), ("lse_b", lse_b), ("attn_sink", attn_sink), ("lse", lse)):
        if x is not None and (x.dtype != torch.float32 or not x.is_contiguous()):
            raise ValueError(f"{name} must be contiguous float32, got {x.dtype} strides {x.stride()}")
    out = torch.empty_like(out_a) if out is None else out
    lse = torch.empty_like(lse_a) if lse is None else lse
    if T == 0:
        return out, lse
    block_d = triton.next_power_of_2(D)
    block_h = max(1, min(16, 4096 // block_d))
    _merge_attn_kernel[(T, triton.cdiv(H, block_h))](
        out_a, lse_a, out_b, lse_b, attn_sink, out, lse,
        H, out_a.stride(0), out_a.stride(1), out_b.stride(0), out_b.stride(1), out.stride(0), out.stride(1),
        D=D, BLOCK_D=block_d, BLOCK_H=block_h, num_warps=4,
    )
    return out, lse


def merge_attn_ref(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    attn_sink: torch.Tensor,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch merge in fp32 (fp64 for fp64 inputs)."""
    _check_merge_inputs(out_a, lse_a, out_b, lse_b, attn_sink, out, lse)
    ct = torch.float64 if out_a.dtype == torch.float64 else torch.float32
    la, lb, sink = lse_a.to(ct), lse_b.to(ct), attn_sink.to(ct)[None, :]
    top = torch.maximum(torch.maximum(la, lb), sink)
    top = top.masked_fill(top == float("-inf"), 0.0)
    za, zb, zs = torch.exp(la - top), torch.exp(lb - top), torch.exp(sink - top)
    den = za + zb + zs
    o = (out_a.to(ct) * (za + zs)[..., None] + out_b.to(ct) * (zb + zs)[..., None]) / den[..., None]
    o = torch.where(den[..., None] == 0, 0.0, o)
    merged = torch.logaddexp(la, lb)
    out = o.to(out_a.dtype) if out is None else out.copy_(o)
    lse = merged.to(lse_dtype(out_a.dtype)) if lse is None else lse.copy_(merged)
    return out, lse
