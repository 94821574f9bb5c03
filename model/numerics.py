"""Numerical building blocks of the reference network: linear, RMSNorm, RoPE, quantization round trips.

Batch invariance: a token's result must not depend on how many other tokens share its forward, so that
chunked prefill reproduces one prefill's state bit for bit and decode reproduces prefill. On the CPU two
things break it: a GEMM with fewer than ~16 rows takes a different kernel than a larger one (`linear` pads
small inputs to `MIN_ROWS` rows), and vectorized transcendental functions (exp, sigmoid, ...) differ in the
last bit from the scalar code that handles a tensor's tail (`softmax`, `sigmoid`, `silu`, `softplus`
compute in float64 and round once to float32, which makes both paths agree).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

MIN_ROWS = 32
FP8_MAX = 448.0
FP4_MAX = 6.0
_FP4_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T over the last dim, batch-invariant on the CPU (see the module docstring)."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1]).to(weight.dtype)
    n = flat.shape[0]
    if flat.device.type == "cpu" and n < MIN_ROWS:
        flat = torch.cat([flat, flat.new_zeros(MIN_ROWS - n, flat.shape[1])])
    return F.linear(flat, weight)[:n].reshape(*lead, weight.shape[0])


def _via_f64(fn, x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:  # GPU elementwise code has no vectorized/scalar split: fp32 is batch-invariant there
        return fn(x.float())
    return fn(x.double()).to(torch.float32)


def softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """fp32 softmax of x along dim, batch-invariant (see the module docstring)."""
    return _via_f64(lambda t: t.softmax(dim), x)


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return _via_f64(torch.sigmoid, x)


def silu(x: torch.Tensor) -> torch.Tensor:
    return _via_f64(F.silu, x)


def softplus(x: torch.Tensor) -> torch.Tensor:
    return _via_f64(F.softplus, x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x · rsqrt(mean(x²) + eps) · weight, in fp32, returned in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


# --- RoPE ------------------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def rope_freqs(rope_dim: int, theta: float, original_seq_len: int, factor: float,
               beta_fast: int, beta_slow: int) -> torch.Tensor:
    """Rotation frequencies `[rope_dim/2]` fp64 on the host (cached: also when a model is built under a device
    context); YaRN interpolation when original_seq_len > 0."""
    freqs = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float64, device="cpu") / rope_dim))
    if original_seq_len > 0:
        def corr_dim(rotations: float) -> float:
            return rope_dim * math.log(original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(corr_dim(beta_fast)), 0)
        high = min(math.ceil(corr_dim(beta_slow)), rope_dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(rope_dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
        freqs = freqs / factor * ramp + freqs * (1 - ramp)
    return freqs


@lru_cache(maxsize=64)
def _on_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A constant table (an lru-cached frequency or Hadamard tensor) copied to `device` once: later calls
    cost no host-to-device copy, so a forward on the GPU neither syncs nor breaks CUDA-graph capture."""
    return table.to(device)


def rope_cos_sin(positions: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `[len(positions), rope_dim/2]` fp32 at these absolute positions (angles in fp64).

    On the GPU the angles are computed there (fp64, no host round trip); on the CPU as always."""
    if positions.is_cuda:
        angles = positions.to(torch.float64)[:, None] * _on_device(freqs, positions.device)[None, :]
        return angles.cos().float(), angles.sin().float()
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """GPT-J RoPE on the last rope dims of x: pairs (x[2i], x[2i+1]) rotate as complex numbers.

    x `[T, ..., D]`; cos/sin `[T, rope_dim/2]` (already indexed by position). inverse: the conjugate rotation.
    """
    rd = cos.shape[-1] * 2
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    c, s = cos.reshape(shape), sin.reshape(shape)
    if inverse:
        s = -s
    rot = x[..., -rd:].float().unflatten(-1, (-1, 2))
    a, b = rot[..., 0], rot[..., 1]
    out = torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)
    return torch.cat([x[..., :-rd], out.to(x.dtype)], dim=-1)


# --- quantization round trips -------------------------------------------------------------------
def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """Round positive x up to a power of two (ue8m0 scales), exactly: x = m·2^e with m in [0.5, 1)."""
    mantissa, exponent = torch.frexp(x)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.ldexp(torch.ones_like(x), exponent)


def fp8_round_trip(x: torch.Tensor, block: int, ue8m0: bool = True) -> torch.Tensor:
    """FP8 e4m3 quantize→dequantize in blocks of `block` along the last dim (per-block amax/448 scale)."""
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"last dim {n} is not a multiple of the FP8 block {block}")
    g = x.float().unflatten(-1, (n // block, block))
    scale = g.abs().amax(-1, keepdim=True).clamp_min(1e-4) / FP8_MAX
    if ue8m0:
        scale = pow2_ceil(scale)
    q = (g / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return (q * scale).flatten(-2).to(x.dtype)


def _round_fp4(a: torch.Tensor) -> torch.Tensor:
    """Round |values| ≤ 6 to the e2m1 grid, ties to the even grid point."""
    grid = torch.tensor(_FP4_GRID, dtype=torch.float32, device=a.device)
    mag = a.abs()
    idx = (torch.searchsorted(grid, mag.contiguous(), right=True) - 1).clamp(0, 7)
    lo, hi = grid[idx], grid[(idx + 1).clamp(max=7)]
    mid = (lo + hi) / 2
    up = (mag > mid) | ((mag == mid) & (idx % 2 == 1))
    return torch.copysign(torch.where(up, hi, lo), a)


def fp4_round_trip(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """FP4 e2m1 quantize→dequantize in blocks of `block` with power-of-two scales (the reference's indexer)."""
    n = x.shape[-1]
    g = x.float().unflatten(-1, (n // block, block))
    scale = pow2_ceil(g.abs().amax(-1, keepdim=True).clamp_min(FP4_MAX * 2.0**-126) / FP4_MAX)
    q = _round_fp4((g / scale).clamp(-FP4_MAX, FP4_MAX))
    return (q * scale).flatten(-2).to(x.dtype)


@lru_cache(maxsize=4)
def hadamard_matrix(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix H_n scaled by n^-0.5 (orthonormal), fp32."""
    if n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h * n**-0.5


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """x · H (the indexer's rotation over the last dim), computed in fp32, returned in x's dtype."""
    h = hadamard_matrix(x.shape[-1])
    # H is symmetric (Sylvester), so H^T is H itself: the device copy is made once per device.
    h_t = _on_device(h, x.device) if x.is_cuda else h.T.contiguous()
    return linear(x.float(), h_t).to(x.dtype)
