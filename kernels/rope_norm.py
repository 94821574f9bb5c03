"""Per-row RMS normalisation, GPT-J RoPE and the FP8 nope round trip of the attention layer in one launch.

docs/dsv4-spec.md "Attention layer", steps 1, 2 and 6: the per-head query norm (no weight) and RoPE, the KV latent's
RMSNorm, RoPE and FP8 round trip, and the inverse RoPE of the attention output. For each row x [D] (one
token, or one (token, head)) with its token's rotation cos, sin [R/2]:

    y         = x · rsqrt(mean(x²) + eps) · weight                     (fp32, only when eps is given) → x.dtype
    y[D−R:]   = RoPE: pairs (a, b) = (y[2i], y[2i+1]) → (a·c − b·s, a·s + b·c), s → −s when inverse
                                                                                 (fp32 from x.dtype) → x.dtype
    y[:D−R]   = FP8 e4m3 round trip in blocks of fp8_block (when > 0): scale = 2^ceil(log2(max(amax, 1e-4)/448)),
                y = e4m3_rtne(clamp(y / scale, ±448)) · scale            (fp32 from x.dtype) → x.dtype

That is the composition model/attention.py computes on the CPU with model/numerics.py (`rms_norm`,
`apply_rope`, `fp8_round_trip`), with the same operation order and the same roundings; on a GPU it replaces
~30 small elementwise launches a layer (decode at small batches paid more for those than for the weights).

API (`backend` as in kernels/device.py):
    rms_rope(x, cos, sin, *, weight, eps, inverse=False, fp8_block=0, out=None, backend="auto") -> Tensor
    rms_rope_ref(x, cos, sin, *, weight, eps, inverse=False, fp8_block=0, out=None): plain PyTorch.
x [n, D] or [n, H, D] bf16/fp16/fp32 with a contiguous last dim (a strided view is fine); cos, sin
[n, R/2] fp32, row t at token t's position; weight [D] or None (only with eps); eps None = no
normalisation; fp8_block 0 or a power of two dividing D − R; out None or like x (written and returned).
Limits: D even and ≤ 512 (a row lives in one program's registers), 2 ≤ R ≤ D.

Kernel: one program per row, grid (n, H). The mean of squares is one tree sum (torch sums in another
order: fp32 results agree to an ulp or two, rounded ones can differ by one step of their format at a
rounding boundary). fp-fusion is off so that a·c − b·s rounds each product as torch's eager kernels do.
The e4m3 rounding and the power-of-two scale are kernels/compressor.py's (integer arithmetic on the fp32
bits: the same on NVIDIA, AMD and the interpreter); the round trip models training, so it is e4m3fn
(max 448) on every platform.

Used by model/attention.py for the query, the KV latent and the output. On the H200 its results equal the
reference within one step of the output's format, plus, for RoPE after a norm, the propagated step of the
rounded normalised pair (tests/kernels/test_rope_norm.py says why).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsepd.kernels.compressor import _e4m3_round, _pow2_scale
from sparsepd.kernels.device import Backend, pick_backend

FP8_MAX = 448.0
AMAX_FLOOR = 1e-4
MAX_DIM = 512
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _rms_rope_kernel(
    x_ptr, cos_ptr, sin_ptr, w_ptr, out_ptr,
    sx_t, sx_h, so_t, so_h, eps,
    D: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr,
    NORM: tl.constexpr, WEIGHT: tl.constexpr, INVERSE: tl.constexpr, FP8_BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    act = out_ptr.dtype.element_ty
    c = tl.arange(0, BLOCK_D)
    c_ok = c < D
    y = tl.load(x_ptr + t * sx_t + h * sx_h + c, mask=c_ok, other=0.0).to(tl.float32)
    if NORM:
        mean_sq = tl.math.div_rn(tl.sum(y * y, axis=0), tl.full([], D, tl.float32))
        y = y * tl.math.rsqrt(mean_sq + eps)
        if WEIGHT:
            y = y * tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        y = y.to(act).to(tl.float32)

    # RoPE on pairs (y[2i], y[2i+1]), pair i rotates with cos/sin[j], j = i − (D − R)/2 ≥ 0
    HALF: tl.constexpr = BLOCK_D // 2
    ev, od = tl.split(tl.reshape(y, [HALF, 2]))
    j = tl.arange(0, HALF) - (D - R) // 2
    rope = (j >= 0) & (j < R // 2)
    cs = tl.load(cos_ptr + t * (R // 2) + j, mask=rope, other=1.0)
    sn = tl.load(sin_ptr + t * (R // 2) + j, mask=rope, other=0.0)
    if INVERSE:
        sn = -sn
    ev, od = tl.where(rope, ev * cs - od * sn, ev), tl.where(rope, ev * sn + od * cs, od)
    y = tl.reshape(tl.join(ev, od), [BLOCK_D]).to(act).to(tl.float32)

    if FP8_BLOCK > 0:
        NB: tl.constexpr = BLOCK_D // FP8_BLOCK
        g = tl.reshape(y, [NB, FP8_BLOCK])
        scale = _pow2_scale(tl.max(tl.abs(g), axis=1), 448.0, True)  # [NB]
        v = tl.math.div_rn(g, scale[:, None])
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        rt = _e4m3_round(v, 7, 0.001953125) * scale[:, None]  # e4m3fn: subnormal step 2^-9
        nope = tl.arange(0, NB) < (D - R) // FP8_BLOCK
        y = tl.reshape(tl.where(nope[:, None], rt, g), [BLOCK_D])
    tl.store(out_ptr + t * so_t + h * so_h + c, y.to(act), mask=c_ok)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check(x, cos, sin, weight, eps, fp8_block, out) -> None:
    _need(isinstance(x, torch.Tensor) and x.dim() in (2, 3) and x.dtype in _DTYPES,
          f"x must be a bf16/fp16/fp32 [n, D] or [n, H, D] tensor, got "
          f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    n, d = x.shape[0], x.shape[-1]
    _need(d % 2 == 0 and 2 <= d <= MAX_DIM, f"the row size D must be even and in [2, {MAX_DIM}], got {d}")
    _need(x.stride(-1) == 1, f"x's last dim must be contiguous, got strides {x.stride()}")
    for name, t in (("cos", cos), ("sin", sin)):
        _need(isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() == 2 and t.is_contiguous(),
              f"{name} must be a contiguous fp32 [n, R/2] tensor, got "
              f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        _need(t.device == x.device, f"{name} is on {t.device}, expected {x.device} (x's device)")
    _need(cos.shape == sin.shape and cos.shape[0] == n and 1 <= cos.shape[1] <= d // 2,
          f"cos and sin must be [n={n}, R/2] with 2 ≤ R ≤ D={d}, got {tuple(cos.shape)}, {tuple(sin.shape)}")
    _need(eps is None or (isinstance(eps, (int, float)) and eps >= 0), f"eps must be None or a float ≥ 0, got {eps!r}")
    if weight is not None:
        _need(eps is not None, "weight is the normalisation's: pass eps with it (eps=None means no normalisation)")
        _need(isinstance(weight, torch.Tensor) and weight.shape == (d,) and weight.dtype in _DTYPES
              and weight.is_contiguous() and weight.device == x.device,
              f"weight must be a contiguous float [{d}] tensor on {x.device}, got "
              f"{getattr(weight, 'dtype', type(weight).__name__)} {tuple(getattr(weight, 'shape', ()))} "
              f"on {getattr(weight, 'device', None)}")
    nope = d - 2 * cos.shape[1]
    _need(isinstance(fp8_block, int) and fp8_block >= 0 and fp8_block & (fp8_block - 1) == 0
          and fp8_block <= MAX_DIM and (fp8_block == 0 or nope % fp8_block == 0),
          f"fp8_block must be 0 or a power of two ≤ {MAX_DIM} dividing the {nope} nope dims, got {fp8_block!r}")
    if out is not None:
        _need(isinstance(out, torch.Tensor) and out.shape == x.shape and out.dtype == x.dtype
              and out.device == x.device and out.stride(-1) == 1,
              f"out must be like x ({x.dtype} {tuple(x.shape)} on {x.device}, contiguous last dim), got "
              f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))} "
              f"strides {out.stride() if isinstance(out, torch.Tensor) else None}")


def rms_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, weight: torch.Tensor | None,
             eps: float | None, inverse: bool = False, fp8_block: int = 0, out: torch.Tensor | None = None,
             backend: Backend = "auto") -> torch.Tensor:
    """Normalise, rotate and FP8 round trip the rows of x (module docstring); same shape and dtype as x."""
    _check(x, cos, sin, weight, eps, fp8_block, out)
    tensors = (x, cos, sin) + ((weight,) if weight is not None else ()) + ((out,) if out is not None else ())
    if pick_backend(backend, *tensors) == "reference":
        return rms_rope_ref(x, cos, sin, weight=weight, eps=eps, inverse=inverse, fp8_block=fp8_block, out=out)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    if x.numel() == 0:
        return out
    x3, o3 = (x, out) if x.dim() == 3 else (x[:, None], out[:, None])  # [n, H, D]
    block_d = max(triton.next_power_of_2(x.shape[-1]), fp8_block, 16)
    _rms_rope_kernel[(x3.shape[0], x3.shape[1])](
        x3, cos, sin, weight if weight is not None else x3, o3,
        x3.stride(0), x3.stride(1), o3.stride(0), o3.stride(1), 0.0 if eps is None else float(eps),
        D=x.shape[-1], R=2 * cos.shape[1], BLOCK_D=block_d,
        NORM=eps is not None, WEIGHT=weight is not None, INVERSE=bool(inverse), FP8_BLOCK=fp8_block,
        num_warps=max(1, block_d // 128), enable_fp_fusion=False,
    )
    return out


def _pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """Positive x rounded up to a power of two, exactly (ue8m0 scales)."""
    mantissa, exponent = torch.frexp(x)
    return torch.ldexp(torch.ones_like(x), torch.where(mantissa == 0.5, exponent - 1, exponent))


def rms_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, weight: torch.Tensor | None,
                 eps: float | None, inverse: bool = False, fp8_block: int = 0,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """rms_rope in plain PyTorch: model/numerics.py's rms_norm, apply_rope and fp8_round_trip, composed."""
    y = x
    if eps is not None:
        xf = x.float()
        yf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        if weight is not None:
            yf = yf * weight.float()
        y = yf.to(x.dtype)
    rd = 2 * cos.shape[-1]
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    c, s = cos.reshape(shape), sin.reshape(shape)
    if inverse:
        s = -s
    rot = y[..., x.shape[-1] - rd:].float().unflatten(-1, (-1, 2))
    a, b = rot[..., 0], rot[..., 1]
    roped = torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(x.dtype)
    nope = y[..., : x.shape[-1] - rd]
    if fp8_block and nope.shape[-1]:
        g = nope.float().unflatten(-1, (-1, fp8_block))
        scale = _pow2_ceil(g.abs().amax(-1, keepdim=True).clamp_min(AMAX_FLOOR) / FP8_MAX)
        q = (g / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
        nope = (q * scale).flatten(-2).to(x.dtype)
    y = torch.cat([nope, roped], dim=-1)
    if out is None:
        return y
    return out.copy_(y)
