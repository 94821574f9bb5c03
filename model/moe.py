"""Mixture of experts (dsv4-spec.md "Block, MoE and head").

Gate: `scores = sqrt(softplus(x · W_gate^T))`; experts chosen by `scores + bias` (top-k), or in the first
n_hash_layers by the fixed table `tid2eid[token_id]`; weights = the chosen unbiased scores renormalised
to sum 1, times route_scale. Experts are SwiGLU with `up` clamped to ±limit and `gate` clamped above at
limit; one shared expert is always added.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsepd.model.config import ModelConfig
from sparsepd.model.numerics import linear, silu, softplus


class Expert(nn.Module):
    def __init__(self, dim: int, inter_dim: int, swiglu_limit: float, dtype: torch.dtype):
        super().__init__()
        self.swiglu_limit = swiglu_limit
        self.w1 = nn.Linear(dim, inter_dim, bias=False, dtype=dtype).requires_grad_(False)  # gate
        self.w2 = nn.Linear(inter_dim, dim, bias=False, dtype=dtype).requires_grad_(False)  # down
        self.w3 = nn.Linear(dim, inter_dim, bias=False, dtype=dtype).requires_grad_(False)  # up

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        gate = linear(x, self.w1.weight).float()
        up = linear(x, self.w3.weight).float()
        if self.swiglu_limit > 0:
            up = up.clamp(-self.swiglu_limit, self.swiglu_limit)
            gate = gate.clamp(max=self.swiglu_limit)
        h = silu(gate) * up
        if weights is not None:
            h = weights * h
        return linear(h.to(x.dtype), self.w2.weight)


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: torch.dtype):
        super().__init__()
        self.topk, self.route_scale = cfg.n_activated_experts, cfg.route_scale
        self.hash = layer_id < cfg.n_hash_layers
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.dim, dtype=dtype), requires_grad=False)
        if self.hash:
            self.tid2eid = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.n_activated_experts, dtype=torch.int64),
                                        requires_grad=False)
            self.bias = None
        else:
            self.bias = nn.Parameter(torch.zeros(cfg.n_routed_experts), requires_grad=False)  # fp32
            self.tid2eid = None

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights `[n, k]` fp32 and expert ids `[n, k]` for x `[n, dim]`."""
        scores = softplus(linear(x.float(), self.weight.float())).sqrt()
        if self.hash:
            indices = self.tid2eid[token_ids]
        else:
            biased = scores + self.bias
            indices = torch.sort(biased, dim=-1, descending=True, stable=True).indices[:, : self.topk]
        weights = scores.gather(1, indices)
        weights = weights / weights.sum(-1, keepdim=True) * self.route_scale
        return weights, indices


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        dtype = getattr(torch, cfg.dtype)
        self.gate = Gate(cfg, layer_id, dtype)
        self.experts = nn.ModuleList(
            Expert(cfg.dim, cfg.moe_inter_dim, cfg.swiglu_limit, dtype) for _ in range(cfg.n_routed_experts))
        self.shared_experts = Expert(cfg.dim, cfg.moe_inter_dim * cfg.n_shared_experts, cfg.swiglu_limit, dtype)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        weights, indices = self.gate(x, token_ids)
        y = torch.zeros_like(x, dtype=torch.float32)
        for e in torch.unique(indices).tolist():
            rows, slot = torch.where(indices == e)
            y.index_add_(0, rows, self.experts[e](x[rows], weights[rows, slot, None]).float())
        y += self.shared_experts(x).float()
        return y.to(x.dtype)
