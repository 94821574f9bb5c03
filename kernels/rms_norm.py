"""RMSNorm of rows of any width in one launch: the model's `attn_norm`, `ffn_norm`, final and compressor norms.

For each row x [D] (one token):

    y = (x · rsqrt(mean(x²) + eps)) · weight        in fp32 from x's dtype, rounded once to x's dtype

model/numerics.py `rms_norm` computes it in PyTorch with ~9 launches on a GPU (the fp32 copies of x and of the
weight, square, mean, add, rsqrt, two products, the copy back to x's dtype); a decode step makes 13 of them on the
`bench` preset (two a layer, the final norm, the compressors'), each a launch of a few µs over a few MB.

API (`backend` as in kernels/device.py):
    rms_norm(x, weight, eps, *, out=None, backend="auto") -> Tensor
    rms_norm_ref(x, weight, eps, *, out=None): model/numerics.py's rms_norm, the same PyTorch operations.
x [..., D] bf16/fp16/fp32 with a contiguous last dim (the leading dims may be strided: a view is fine, it is read
as rows of stride x.stride(-2)); weight [D] (any float dtype, read as fp32) or None; out None or like x.

Kernel: one program per row; a row of up to MAX_DIM values lives in one program's registers (bench and V4-Flash
dim 4096, V4-Pro 7168). The mean of squares is one tree sum then a correctly rounded division (torch sums in
another order: fp32 results agree to an ulp or two; a rounded result can differ by one step of x's format at a
rounding boundary, the bound tests/kernels/test_rms_norm.py checks). The two products round separately as torch's
eager kernels do (fp-fusion off). The result of a row does not depend on the other rows (batch invariance: a
token's norm is the same in a prefill chunk and in a decode step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsepd.kernels.device import Backend, pick_backend

MAX_DIM = 16384
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, sx, so, eps, D: tl.constexpr, BLOCK_D: tl.constexpr,
                     WEIGHT: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_D)
    ok = c < D
    x = tl.load(x_ptr + t * sx + c, mask=ok, other=0.0).to(tl.float32)
    mean_sq = tl.math.div_rn(tl.sum(x * x, axis=0), tl.full([], D, tl.float32))
    y = x * tl.math.rsqrt(mean_sq + eps)
    if WEIGHT:
        y = y * tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * so + c, y.to(out_ptr.dtype.element_ty), mask=ok)


def _check(x: torch.Tensor, weight: torch.Tensor | None, out: torch.Tensor | None) -> None:
    if x.dtype not in _DTYPES:
        raise ValueError(f"rms_norm: x must be bf16, fp16 or fp32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"rms_norm: x must have a last dim ≥ 1, got shape {tuple(x.shape)}")
    if x.shape[-1] > MAX_DIM:
        raise ValueError(f"rms_norm: rows of {x.shape[-1]} values exceed MAX_DIM={MAX_DIM}")
    if weight is not None and (weight.shape != (x.shape[-1],) or not weight.dtype.is_floating_point):
        raise ValueError(f"rms_norm: weight must be a float [{x.shape[-1]}], got {weight.dtype} {tuple(weight.shape)}")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype):
        raise ValueError(f"rms_norm: out must be like x {tuple(x.shape)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """t as [n, D] rows of one stride without a copy (None when its leading dims are not one stride)."""
    if t.stride(-1) != 1:
        return None
    if t.dim() == 1:
        return t[None]
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, *, out: torch.Tensor | None = None,
             backend: Backend = "auto") -> torch.Tensor:
    """x · rsqrt(mean(x²) + eps) · weight over the last dim, in fp32, returned in x's dtype (module docstring)."""
    _check(x, weight, out)
    tensors = (x,) + ((weight,) if weight is not None else ()) + ((out,) if out is not None else ())
    if pick_backend(backend, *tensors) == "reference":
        return rms_norm_ref(x, weight, eps, out=out)
    result = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    if x.numel() == 0:
        return result
    x2 = _rows(x)
    if x2 is None:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
    o2 = _rows(result)
    target = result if o2 is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o2 = o2 if o2 is not None else target.view(-1, x.shape[-1])
    block = triton.next_power_of_2(x.shape[-1])
    _rms_norm_kernel[(x2.shape[0],)](
        x2, weight if weight is not None else x2, o2, x2.stride(0), o2.stride(0), float(eps),
        D=x.shape[-1], BLOCK_D=block, WEIGHT=weight is not None,
        num_warps=min(16, max(1, block // 256)), enable_fp_fusion=False,
    )
    if target is not result:
        result.copy_(target)
    return result


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float, *,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """rms_norm in plain PyTorch: model/numerics.py's rms_norm, the same operations in the same order (kernels do
    not import the model; tests/kernels/test_rms_norm.py checks the two agree bit for bit)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    y = y.to(x.dtype)
    return y if out is None else out.copy_(y)
