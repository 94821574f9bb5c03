"""FP8 block-scaled linear layers: y = x · W^T with W kept in FP8 e4m3 and x quantized on the fly.

Weights (as the checkpoint stores them, dsv4-spec.md "Quantized weights"): W [N, K] FP8 e4m3 with one fp32 scale a
128×128 tile, s_w [ceil(N/128), ceil(K/128)] (ue8m0: powers of two; partial tiles at the right and bottom edges).
Activations, per row m and block kb of 128 along K (as DeepSeek's reference inference does):

    amax[m, kb] = max(max_k |x[m, k]|, 1e-4)          (the floor keeps an all-zero block's scale > 0)
    s_x[m, kb]  = 2^ceil(log2(amax / 448))           (ue8m0: a power of two, so x / s_x is exact)
    q_x[m, k]   = e4m3(x[m, k] / s_x[m, kb])         (round to nearest even; |x / s_x| ≤ 448 by construction)
    y[m, n]     = Σ_kb (Σ_{k in kb} q_x[m, k] · q_w[n, k]) · s_x[m, kb] · s_w[n // 128, kb]     (fp32, then x's dtype)

References (plain PyTorch, also the CPU path): `act_quant_ref`, `dequant_fp8_block`, `fp8_linear_ref` (both
operands dequantized exactly to fp32, one fp32 matmul, cast to x's dtype).
"""

from __future__ import annotations

import torch

from sparsepd.kernels.device import Backend, pick_backend

BLOCK = 128  # the weight tile and the activation block along K
FP8_MAX = 448.0  # largest finite e4m3fn value
AMAX_FLOOR = 1e-4  # DeepSeek's reference clamps amax so that an all-zero block gets a finite, nonzero scale
_FLOAT_INPUTS = (torch.bfloat16, torch.float16, torch.float32)


def _pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """Round positive fp32 x up to a power of two, exactly (x = m·2^e with m in [0.5, 1))."""
    mantissa, exponent = torch.frexp(x)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.ldexp(torch.ones_like(x), exponent)


def _check_act(x: torch.Tensor, block: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in _FLOAT_INPUTS:
        raise TypeError(f"x must be a bf16/fp16/fp32 [..., K] tensor, got {getattr(x, 'dtype', type(x))} "
                        f"{list(getattr(x, 'shape', ()))}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")


def act_quant_ref(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 1×block FP8 quantization of x [..., K] (module docstring): (q [..., K] e4m3fn, s [..., ceil(K/block)]
    fp32); the last block may be partial."""
    _check_act(x, block)
    K = x.shape[-1]
    nb = -(-K // block)
    xf = torch.nn.functional.pad(x.float(), (0, nb * block - K)).unflatten(-1, (nb, block))  # [..., nb, block]
    amax = xf.abs().amax(-1).clamp_min(AMAX_FLOOR)  # [..., nb]; a NaN stays a NaN
    scale = _pow2_ceil(amax / FP8_MAX)
    q = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2)[..., :K], scale


def act_quant(x: torch.Tensor, block: int = BLOCK, *, backend: Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """`act_quant_ref`'s result, from a Triton kernel on GPU tensors."""
    _check_act(x, block)
    if pick_backend(backend, x) == "reference":
        return act_quant_ref(x, block)
    raise NotImplementedError("the Triton act_quant is not built yet")


def dequant_fp8_block(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """W [N, K] FP8 times its 128×128 tile scales [ceil(N/128), ceil(K/128)] → fp32 [N, K] (exact)."""
    _check_weight(weight, weight_scale)
    N, K = weight.shape
    full = weight_scale.float().repeat_interleave(BLOCK, 0)[:N].repeat_interleave(BLOCK, 1)[:, :K]
    return weight.float() * full


def _check_weight(weight: torch.Tensor, weight_scale: torch.Tensor) -> None:
    if weight.dim() != 2 or weight.dtype not in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        raise TypeError(f"weight must be FP8 e4m3 [N, K], got {weight.dtype} {list(weight.shape)}")
    N, K = weight.shape
    want = (-(-N // BLOCK), -(-K // BLOCK))
    if tuple(weight_scale.shape) != want or weight_scale.dtype != torch.float32:
        raise ValueError(f"weight_scale must be fp32 {list(want)} (one per 128×128 tile of [{N}, {K}]), got "
                         f"{weight_scale.dtype} {list(weight_scale.shape)}")
    if weight_scale.device != weight.device:
        raise ValueError(f"weight_scale is on {weight_scale.device}, weight on {weight.device}")


def _check_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> None:
    _check_act(x, BLOCK)
    _check_weight(weight, weight_scale)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dim {x.shape[-1]} must equal weight's K = {weight.shape[1]}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device}, weight on {weight.device}")


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] → [..., N] in x's dtype: `act_quant_ref`, both operands dequantized exactly, one fp32 matmul."""
    _check_linear(x, weight, weight_scale)
    q, s = act_quant_ref(x)
    K = x.shape[-1]
    x_deq = q.float() * s.repeat_interleave(BLOCK, -1)[..., :K]
    return (x_deq @ dequant_fp8_block(weight, weight_scale).T).to(x.dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, *,
               backend: Backend = "auto") -> torch.Tensor:
    """y = x · W^T [..., N] in x's dtype, with W [N, K] FP8 and its 128×128 tile scales (module docstring)."""
    _check_linear(x, weight, weight_scale)
    if pick_backend(backend, x, weight, weight_scale) == "reference":
        return fp8_linear_ref(x, weight, weight_scale)
    raise NotImplementedError("the Triton fp8_linear is not built yet")
