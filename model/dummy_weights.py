"""Dummy weights (`--load-format dummy`): random weights made on the model's device, directly in its weight format,
no files and no full-size host or bf16 copies, at any preset's dimensions.

Every parameter draws from the device's generator re-seeded from (seed, its name), so its values depend on
neither the order nor the other parameters. A weight V4 stores in FP8 (`FP8_PROJECTIONS`) is drawn as FP8 tiles
and a routed expert's as packed FP4 blocks whatever form the model holds it in: a model that keeps it quantized
gets the bytes and scales, a plain one (`--dtype bf16`) their exact dequantized values. So with the same seed,
on the same kind of device, `--dtype bf16` is the dequantized reference of the quantized model.

Sizes follow model/init_rules.py, so activations stay O(1) through every layer:
- FP8 tiles, 128 rows at a time: x ~ N(0, std²) in fp32, one scale a 128×128 tile 2^(round(log2(std/32)) + r),
  r uniform in {−1, 0, 1} (the kernels see varied tile scales); e4m3 = x / scale, |x / scale| ≤ 448 up to 4.9σ
  (saturated beyond). The weight's std is std up to e4m3 rounding.
- FP4 blocks, one expert projection at a time: uniform random e2m1 codes (rms 2.93), one scale per 32 inputs
  2^(round(log2(std/3.87)) + r), r uniform in {−1, 0, 1} (E[4^r] = 1.75 and 2.93·√1.75 = 3.87): the std lands
  within a factor √2 of std.
"""

from __future__ import annotations

import math
import zlib

import torch

from sparsepd.kernels.moe import dequant_fp4
from sparsepd.model.init_rules import hc_base, init_rule
from sparsepd.model.linear import FP8_PROJECTIONS, ROUTED_EXPERTS
from sparsepd.model.numerics import FP8_MAX
from sparsepd.model.transformer import Transformer
from sparsepd.model_config import FP4_BLOCK, ModelConfig

TILE = 128  # FP8 weight tile (rows and columns)
_FP8_SPREAD = 32.0  # |x / scale| rms at jitter 0
_FP4_RMS = 3.87  # rms of a uniform e2m1 code times 2^r, r uniform in {−1, 0, 1}


def init_dummy(model: Transformer, seed: int) -> Transformer:
    """Fill every parameter of `model` on its device from `seed` (module docstring)."""
    cfg = model.cfg
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    gen = torch.Generator(device=device)
    with torch.no_grad():
        for name, p in params.items():
            if name.endswith(".scale") and name[: -len("scale")] + "weight" in params:
                continue  # filled with its weight
            gen.manual_seed(_seed(seed, name))
            scale = params.get(name[: -len("weight")] + "scale")
            if FP8_PROJECTIONS.search(name):
                _fill_fp8(p, scale, tuple(p.shape), init_rule(cfg, name, tuple(p.shape))[1], gen)
            elif ROUTED_EXPERTS.search(name):
                shape = (p.shape[0], p.shape[1] * 2) if scale is not None else tuple(p.shape)  # packed: 2 a byte
                _fill_fp4(p, scale, shape, init_rule(cfg, name, shape)[1], gen)
            else:
                _fill_plain(cfg, name, p, gen)
    return model


def _seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**62


def _fill_fp8(weight: torch.Tensor, scale: torch.Tensor | None, shape: tuple[int, int], std: float,
              gen: torch.Generator) -> None:
    """FP8 tiles of a `shape` weight: into `weight` (e4m3) and `scale` (fp32 per tile) when the model keeps them,
    else their dequantized values into `weight`."""
    rows, cols = shape
    tiles = math.ceil(cols / TILE)
    base = round(math.log2(std / _FP8_SPREAD))
    for r0 in range(0, rows, TILE):
        r1 = min(r0 + TILE, rows)
        x = torch.randn(r1 - r0, cols, generator=gen, device=weight.device) * std  # [≤128, cols] fp32
        jitter = torch.randint(-1, 2, (tiles,), generator=gen, device=weight.device)
        tile_scale = torch.exp2((base + jitter).float())  # [tiles]
        full = tile_scale.repeat_interleave(TILE)[:cols]
        q = (x / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        if scale is not None:
            weight[r0:r1] = q
            scale[r0 // TILE] = tile_scale
        else:
            weight[r0:r1] = (q.float() * full).to(weight.dtype)


def _fill_fp4(weight: torch.Tensor, scale: torch.Tensor | None, shape: tuple[int, int], std: float,
              gen: torch.Generator) -> None:
    """Packed FP4 blocks of a `shape` expert weight: the bytes into `weight` and the ue8m0 bytes into `scale` when
    the model keeps them, else their dequantized values (inputs past a multiple of 32 drawn and dropped)."""
    rows, cols = shape
    padded = math.ceil(cols / FP4_BLOCK) * FP4_BLOCK
    codes = torch.empty(rows, padded // 2, dtype=torch.uint8, device=weight.device).random_(0, 256, generator=gen)
    exponents = torch.empty(rows, padded // FP4_BLOCK, dtype=torch.uint8, device=weight.device)
    exponents.random_(0, 3, generator=gen)
    exponents += 127 + round(math.log2(std / _FP4_RMS)) - 1  # 2^(base + r), r in {−1, 0, 1}
    if scale is not None:
        weight.copy_(codes)
        scale.copy_(exponents)
    else:
        weight.copy_(dequant_fp4(codes, exponents)[:, :cols])


def _fill_plain(cfg: ModelConfig, name: str, p: torch.Tensor, gen: torch.Generator) -> None:
    kind, value = init_rule(cfg, name, tuple(p.shape))
    if kind == "normal":
        p.normal_(0.0, value, generator=gen)
    elif kind == "const":
        p.fill_(value)
    elif kind == "hc_base":
        p.copy_(hc_base(p.shape[0], cfg.hc_mult))
    else:  # the hash-routing table: k distinct experts a token
        draws = torch.rand(p.shape[0], cfg.n_routed_experts, generator=gen, device=p.device)
        p.copy_(draws.argsort(-1)[:, : p.shape[1]])
