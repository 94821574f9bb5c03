"""Mixture of experts (docs/dsv4-spec.md "Block, MoE and head").

Gate: `scores = sqrt(softplus(x · W_gate^T))`; experts chosen by `scores + bias` (top-k), or in the first
n_hash_layers by the fixed table `tid2eid[token_id]`; weights = the chosen unbiased scores renormalised
to sum 1, times route_scale. Experts are SwiGLU with `up` clamped to ±limit and `gate` clamped above at
limit; one shared expert is always added.

On GPU tensors the routed experts run as two grouped GEMMs without host syncs (`sparsepd.kernels.moe`, CUDA
graph friendly) over stacked copies of the expert weights; on the CPU the per-expert loop below is the reference.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsepd.kernels.device import pick_backend
from sparsepd.kernels.moe import moe
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
        self._stacked: tuple[torch.Tensor, torch.Tensor] | None = None  # see stacked_weights

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        weights, indices = self.gate(x, token_ids)
        if pick_backend("auto", x) == "triton":
            w13, w2 = self.stacked_weights()
            y = moe(x, weights, indices, w13, w2, self.experts[0].swiglu_limit, backend="triton")
        else:
            y = torch.zeros_like(x, dtype=torch.float32)
            for e in torch.unique(indices).tolist():
                rows, slot = torch.where(indices == e)
                y.index_add_(0, rows, self.experts[e](x[rows], weights[rows, slot, None]).float())
        y += self.shared_experts(x).float()
        return y.to(x.dtype)

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The routed experts' weights as `w13 [E, 2·inter, dim]` (W1 rows, then W3 rows) and `w2 [E, dim, inter]`.

        Built at the first call (the first GPU forward: run one eager forward before capturing a graph); each
        expert's parameters then become views into these tensors, so the weights are held once and the checkpoint
        names, state_dict and in-place loads keep working. Built again if the parameters were replaced since
        (e.g. by `model.to(device)`).
        """
        first, last = self.experts[0], self.experts[-1]
        if (self._stacked is not None and first.w1.weight.data_ptr() == self._stacked[0].data_ptr()
                and last.w2.weight.data_ptr() == self._stacked[1][-1].data_ptr()):
            return self._stacked
        inter, dim = first.w1.weight.shape
        like = first.w1.weight
        with torch.inference_mode(False), torch.no_grad():  # plain tensors: load_state_dict copies into them
            w13 = torch.empty((len(self.experts), 2 * inter, dim), dtype=like.dtype, device=like.device)
            w2 = torch.empty((len(self.experts), dim, inter), dtype=like.dtype, device=like.device)
            for e, expert in enumerate(self.experts):  # one expert at a time: the old copies go as we go
                w13[e, :inter].copy_(expert.w1.weight)
                w13[e, inter:].copy_(expert.w3.weight)
                w2[e].copy_(expert.w2.weight)
                expert.w1.weight.data = w13[e, :inter]
                expert.w3.weight.data = w13[e, inter:]
                expert.w2.weight.data = w2[e]
        self._stacked = (w13, w2)
        return self._stacked
