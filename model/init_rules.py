"""What random weights look like, parameter by parameter (shared by the host init in model/weights.py and the
on-device dummy init in model/dummy_weights.py).

They keep activations O(1) through every layer (tests assert it): projections are scaled by 1/sqrt(fan_in),
the hyper-connection mixes start near "average the copies in, write the output once", and output projections
are shrunk by 1/sqrt(2·n_layers) so the residual stream does not grow with depth.
"""

from __future__ import annotations

import math

import torch

from sparsepd.model_config import ModelConfig


def init_rule(cfg: ModelConfig, name: str, shape: tuple[int, ...]) -> tuple[str, float]:
    """How random weights fill parameter `name` (a projection's shape is its logical `[out, in]`): ("normal", std),
    ("const", value), ("hc_base", 0) or ("table", 0) (see the module docstring for why these)."""
    leaf = name.rsplit(".", 1)[-1]
    parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    if leaf == "tid2eid":
        return "table", 0.0
    if leaf == "attn_sink" or name == "embed.weight":
        return "normal", 1.0
    if leaf in ("ape", "bias"):
        return "normal", 0.1
    if leaf.endswith("_fn"):
        return "normal", 0.5 / math.sqrt(shape[1])
    if leaf.endswith("_scale"):
        return "const", 0.5
    if leaf.endswith("_base"):
        return "hc_base", 0.0
    if parent.endswith("norm") or leaf == "norm":
        return "const", 1.0
    std = 1.0 / math.sqrt(shape[-1])
    if parent in ("wo_b", "w2"):
        std /= math.sqrt(2 * cfg.n_layers)
    return "normal", std


def hc_base(mix: int, hc: int) -> torch.Tensor:
    """pre ≈ 1/hc (average the copies), post ≈ 1, comb ≈ identity; the head's base: pre ≈ 1/hc."""
    base = torch.zeros(mix)
    base[:hc] = math.log(1.0 / (hc - 1)) if hc > 1 else 0.0  # sigmoid(b) = 1/hc
    if mix > hc:
        base[2 * hc:] = (torch.eye(hc) * 4.0).flatten()
    return base
