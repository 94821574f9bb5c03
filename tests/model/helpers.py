"""Shared fixtures of the model tests: one tiny model per test module, seeded prompts."""

from __future__ import annotations

import torch

from sparsepd.model.transformer import Transformer
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset


def tiny_model(seed: int = 0, **overrides: object) -> Transformer:
    return build_model(get_preset("tiny", **overrides), seed=seed)


def prompt(length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (length,), generator=gen)
