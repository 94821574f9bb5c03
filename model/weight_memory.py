"""Bytes of a model's weights by kind, for the memory plan a process prints when it loads (and the README's
per-GPU numbers): of a built model, or of a config before anything is allocated (built on the meta device)."""

from __future__ import annotations

import torch

from sparsepd.model.transformer import Transformer
from sparsepd.model_config import ModelConfig

KINDS = ("fp8", "fp4", "scales", "bf16", "fp32", "tables")


def weight_bytes(model: Transformer) -> dict[str, int]:
    """{kind: bytes}: fp8 (e4m3 projections), fp4 (packed routed experts), scales (theirs: fp32 tiles, ue8m0
    bytes), bf16 / fp32 (plain weights), tables (hash routing)."""
    out = dict.fromkeys(KINDS, 0)
    for name, p in model.named_parameters():
        out[_kind(name, p)] += p.numel() * p.element_size()
    return out


def planned_weight_bytes(cfg: ModelConfig) -> dict[str, int]:
    """`weight_bytes` of the model `cfg` describes, without allocating it."""
    with torch.device("meta"):
        return weight_bytes(Transformer(cfg))


def describe(kinds: dict[str, int]) -> str:
    """'12.35 GB (fp8 3.10 GB, fp4 7.92 GB, ...)', kinds with no bytes left out."""
    parts = ", ".join(f"{k} {gb(v)}" for k, v in kinds.items() if v)
    return f"{gb(sum(kinds.values()))} ({parts})"


def gb(num_bytes: int) -> str:
    """Bytes in GB (MB, kB below a GB, a MB)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if num_bytes >= size:
            return f"{num_bytes / size:.2f} {unit}"
    return f"{num_bytes / 1e3:.2f} kB"


def _kind(name: str, p: torch.Tensor) -> str:
    if p.dtype == torch.float8_e4m3fn:
        return "fp8"
    if name.endswith(".scale"):
        return "scales"
    if p.dtype == torch.uint8:
        return "fp4"
    if not p.dtype.is_floating_point:
        return "tables"
    return "bf16" if p.dtype == torch.bfloat16 else "fp32"
