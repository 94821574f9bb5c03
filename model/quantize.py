"""Quantizing weights into the published V4 checkpoint layout (what `model/weights.py` loads kept quantized):
the FP8 projections (`linear.FP8_PROJECTIONS`) as e4m3 with one ue8m0 (power-of-two) scale per 128×128 tile,
the routed experts (`linear.ROUTED_EXPERTS`) as e2m1 codes packed two a byte (the even column in the low
nibble) with one ue8m0 scale per 32 inputs of a row. Scales are the smallest power of two that maps the
block's largest magnitude into the format's range (448 for e4m3, 6 for e2m1), as DeepSeek's own conversion
does; values round to the nearest representable one.

Everything else keeps the published dtypes: bf16, except the tensors V4 keeps in fp32 (`FP32_TENSORS`), the
hash gate's table as int32, and the MTP layer (`mtp.*`, read plain by `model/mtp.py`) as it was."""

from __future__ import annotations

import math
import re

import torch

from sparsepd.model.linear import FP8_PROJECTIONS, ROUTED_EXPERTS
from sparsepd.model.mtp import MTP_PREFIX

FP8_TILE = 128
FP4_GROUP = 32
FP32_TENSORS = re.compile(r"(attn_sink|hc_\w+|gate\.bias|compressor\.(ape|wkv\.weight|wgate\.weight))$")
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _pow2_scale(amax: torch.Tensor, top: float) -> torch.Tensor:
    """The smallest power of two s with amax / s ≤ top (an all-zero block gets 2^-126: any scale is exact)."""
    return torch.exp2(torch.ceil(torch.log2(amax.clamp(min=2.0**-126 * top) / top)))


def quantize_fp8_tiles(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] → (e4m3 [R, C], ue8m0 scales [⌈R/128⌉, ⌈C/128⌉]); tiles at the edges are partial."""
    if w.dim() != 2:
        raise ValueError(f"an FP8 weight is 2-D, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    w = w.float()
    padded = torch.zeros(math.ceil(rows / FP8_TILE) * FP8_TILE, math.ceil(cols / FP8_TILE) * FP8_TILE)
    padded[:rows, :cols] = w.abs()
    scale = _pow2_scale(padded.unflatten(0, (-1, FP8_TILE)).unflatten(2, (-1, FP8_TILE)).amax((1, 3)), 448.0)
    full = scale.repeat_interleave(FP8_TILE, 0)[:rows].repeat_interleave(FP8_TILE, 1)[:, :cols]
    return (w / full).to(torch.float8_e4m3fn), scale.to(torch.float8_e8m0fnu)


def quantize_fp4_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] (C a multiple of 32) → (packed e2m1 int8 [R, C/2], ue8m0 scales [R, C/32])."""
    if w.dim() != 2 or w.shape[1] % FP4_GROUP:
        raise ValueError(f"an FP4 weight is 2-D with a multiple of {FP4_GROUP} columns, got {tuple(w.shape)}")
    w = w.float()
    groups = w.unflatten(1, (-1, FP4_GROUP))
    scale = _pow2_scale(groups.abs().amax(-1), 6.0)  # [R, C/32]
    x = (groups / scale[..., None]).flatten(1)
    code = (x.abs()[..., None] - torch.tensor(E2M1_VALUES)).abs().argmin(-1)  # ties: the smaller magnitude
    code = code | (((x < 0) & (code > 0)).long() << 3)
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return packed, scale.to(torch.float8_e8m0fnu)


def quantize_state(tensors: dict[str, torch.Tensor], experts: str = "fp4") -> dict[str, torch.Tensor]:
    """A checkpoint's tensors (published names, any float dtype) in the published quantized layout: FP8
    projections, routed experts in FP4 (`experts="fp4"`) or FP8 tiles (`"fp8"`), `.scale` beside each."""
    if experts not in ("fp4", "fp8"):
        raise ValueError(f"experts must be 'fp4' or 'fp8', got {experts!r}")
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        scale_name = name[: -len("weight")] + "scale"
        if name.startswith(MTP_PREFIX) or not t.is_floating_point():
            out[name] = t.to(torch.int32) if name.endswith("tid2eid") else t
        elif ROUTED_EXPERTS.search(name):
            out[name], out[scale_name] = (quantize_fp4_groups(t) if experts == "fp4" else quantize_fp8_tiles(t))
        elif FP8_PROJECTIONS.search(name):
            out[name], out[scale_name] = quantize_fp8_tiles(t)
        else:
            out[name] = t.float() if FP32_TENSORS.search(name) else t.to(torch.bfloat16)
    return out


def quantized_config(config: dict, experts: str = "fp4") -> dict:
    """A published config.json (dict) for the quantized layout: bf16 activations, FP8 block quantization with
    ue8m0 scales, `expert_dtype` for the experts."""
    out = {k: v for k, v in config.items() if k not in ("torch_dtype", "dtype", "quantization_config")}
    out["torch_dtype"] = "bfloat16"
    out["expert_dtype"] = experts
    out["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "scale_fmt": "ue8m0", "weight_block_size": [FP8_TILE, FP8_TILE]}
    return out
