"""The SwiGLU activation between an expert's GEMMs in one launch (docs/dsv4-spec.md "Block, MoE and head").

For the GEMM outputs gate = x·W1ᵀ and up = x·W3ᵀ (x's dtype, [n, inter]), L = swiglu_limit and optional routing
weights w [n, 1] fp32:

    g = min(gate, L)        u = clamp(up, −L, L)          (fp32; no clamps when L ≤ 0)
    h = silu(g) · u,  silu(g) = g / (1 + exp(−g))          (fp32)
    h = w · h                                              (fp32, only with w)   → h in gate's dtype

That is model/moe.py's `swiglu` between w1/w3 and w2, with the same operation order and one rounding at the end;
on a GPU it replaces 7 elementwise launches (two upcasts, two clamps, silu, the product, the downcast; 8 with w).

API (`backend` as in kernels/device.py):
    silu_mul(gate, up, limit, weights=None, *, out=None, backend="auto") -> Tensor [n, inter] in gate's dtype
    silu_mul_ref(gate, up, limit, weights=None, *, out=None): plain PyTorch, the CPU path.
gate, up [n, inter] bf16/fp16/fp32 of one dtype with a contiguous last dim; weights None or fp32 [n, 1]; out None
or like gate (written and returned).

Numerics: compiled, silu is fp32 `g / (1 + expf(−g))` with the device libm's expf (libdevice / ocml, ≤ 2 ulp) and
an IEEE division, the products unfused (fp-fusion off): the expression torch's CUDA silu kernel evaluates. In bf16,
the model's format, the result equals torch's on an H100 bit for bit (tests/kernels/test_swiglu.py,
test_gpu_bitwise_equal); in fp32 the two expf implementations differ by an ulp or two in many values, within the
bound that test file states. In the interpreter (no libdevice there) silu is evaluated in float64 and rounded
once to fp32, as the CPU reference does (model/numerics.py `silu`, batch invariance), and the rounding to bf16 is
done on the bits (the interpreter's cast truncates), so both agree on the CPU too. As torch.clamp, a NaN stays a NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra import libdevice

from sparsepd.kernels.device import Backend, pick_backend, triton_interpreting

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCK = 1024  # columns a program: inter is 2048 (v4-flash) or 3072 (v4-pro) for the shared expert


@triton.jit
def _silu(g, INTERPRET: tl.constexpr):
    """silu of fp32 g as fp32: g / (1 + exp(−g)); in the interpreter in float64, rounded once."""
    if INTERPRET:
        g64 = g.to(tl.float64)
        return (g64 / (1.0 + tl.exp(-g64))).to(tl.float32)
    return tl.math.div_rn(g, 1.0 + libdevice.exp(-g))


@triton.jit
def _round_to(h, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 h rounded to nearest even in dtype. The interpreter's fp32 → bf16 cast truncates: there the rounding
    is done on the bits first (NaN kept), so the cast that follows is exact."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = h.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 = 0xFFFF0000
        h = tl.where(h != h, h, bits.to(tl.float32, bitcast=True))
    return h.to(dtype)


@triton.jit
def _silu_mul_kernel(
    gate_ptr, up_ptr, w_ptr, out_ptr, inter, s_gate, s_up, s_w, s_out, limit,
    BLOCK_N: tl.constexpr, CLAMP: tl.constexpr, WEIGHTS: tl.constexpr, INTERPRET: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = cols < inter
    g = tl.load(gate_ptr + row * s_gate + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * s_up + cols, mask=ok, other=0.0).to(tl.float32)
    if CLAMP:  # as torch.clamp (kernels/moe.py's _gate_up_kernel): a NaN stays a NaN
        u = tl.minimum(tl.maximum(u, -limit, propagate_nan=tl.PropagateNan.ALL), limit,
                       propagate_nan=tl.PropagateNan.ALL)
        g = tl.minimum(g, limit, propagate_nan=tl.PropagateNan.ALL)
    h = _silu(g, INTERPRET) * u
    if WEIGHTS:
        h = tl.load(w_ptr + row * s_w) * h
    tl.store(out_ptr + row * s_out + cols, _round_to(h, out_ptr.dtype.element_ty, INTERPRET), mask=ok)


def _check(gate, up, weights, out) -> None:
    if not isinstance(gate, torch.Tensor) or gate.dim() != 2 or gate.dtype not in _DTYPES:
        raise ValueError(f"gate must be a bf16/fp16/fp32 [n, inter] tensor, got "
                         f"{getattr(gate, 'dtype', type(gate).__name__)} {tuple(getattr(gate, 'shape', ()))}")
    if not isinstance(up, torch.Tensor) or up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device:
        raise ValueError(f"up must be like gate ({gate.dtype} {tuple(gate.shape)} on {gate.device}), got "
                         f"{getattr(up, 'dtype', type(up).__name__)} {tuple(getattr(up, 'shape', ()))} "
                         f"on {getattr(up, 'device', None)}")
    if gate.stride(-1) != 1 or up.stride(-1) != 1:
        raise ValueError(f"gate and up need a contiguous last dim, got strides {gate.stride()}, {up.stride()}")
    if weights is not None and (not isinstance(weights, torch.Tensor) or weights.dtype != torch.float32
                                or weights.shape != (gate.shape[0], 1) or weights.device != gate.device):
        raise ValueError(f"weights must be None or fp32 [{gate.shape[0]}, 1] on {gate.device}, got "
                         f"{getattr(weights, 'dtype', type(weights).__name__)} "
                         f"{tuple(getattr(weights, 'shape', ()))} on {getattr(weights, 'device', None)}")
    if out is not None and (not isinstance(out, torch.Tensor) or out.shape != gate.shape or out.dtype != gate.dtype
                            or out.device != gate.device or out.stride(-1) != 1):
        raise ValueError(f"out must be like gate ({gate.dtype} {tuple(gate.shape)} on {gate.device}, contiguous "
                         f"last dim), got {getattr(out, 'dtype', type(out).__name__)} "
                         f"{tuple(getattr(out, 'shape', ()))}")


def silu_mul(gate: torch.Tensor, up: torch.Tensor, limit: float, weights: torch.Tensor | None = None, *,
             out: torch.Tensor | None = None, backend: Backend = "auto") -> torch.Tensor:
    """[weights ·] silu(min(gate, limit)) · clamp(up, ±limit) in fp32, rounded once to gate's dtype (module doc)."""
    _check(gate, up, weights, out)
    tensors = (gate, up) + ((weights,) if weights is not None else ()) + ((out,) if out is not None else ())
    if pick_backend(backend, *tensors) == "reference":
        return silu_mul_ref(gate, up, limit, weights, out=out)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) if out is None else out
    n, inter = gate.shape
    if gate.numel() == 0:
        return out
    block_n = min(BLOCK, max(16, triton.next_power_of_2(inter)))
    _silu_mul_kernel[(n, triton.cdiv(inter, block_n))](
        gate, up, weights if weights is not None else gate, out, inter,
        gate.stride(0), up.stride(0), weights.stride(0) if weights is not None else 0, out.stride(0),
        float(limit),
        BLOCK_N=block_n, CLAMP=limit > 0, WEIGHTS=weights is not None, INTERPRET=triton_interpreting(),
        num_warps=4, enable_fp_fusion=False,
    )
    return out


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor, limit: float, weights: torch.Tensor | None = None, *,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """silu_mul in plain PyTorch: model/moe.py's swiglu between the GEMMs, silu as model/numerics.py's (fp32 on
    CUDA, float64 rounded once to fp32 elsewhere)."""
    g, u = gate.float(), up.float()
    if limit > 0:
        u = u.clamp(-limit, limit)
        g = g.clamp(max=limit)
    s = F.silu(g) if g.is_cuda else F.silu(g.double()).to(torch.float32)
    h = s * u
    if weights is not None:
        h = weights * h
    if out is None:
        return h.to(gate.dtype)
    return out.copy_(h)
