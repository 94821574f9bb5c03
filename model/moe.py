"""Mixture of experts (docs/dsv4-spec.md "Block, MoE and head").

Gate: `scores = sqrt(softplus(x · W_gate^T))`; experts chosen by `scores + bias` (top-k), or in the first
n_hash_layers by the fixed table `tid2eid[token_id]`; weights = the chosen unbiased scores renormalised
to sum 1, times route_scale. Experts are SwiGLU with `up` clamped to ±limit and `gate` clamped above at
limit; one shared expert is always added.

On GPU tensors the routed experts run as two grouped GEMMs without host syncs (`sparsepd.kernels.moe`, CUDA
graph friendly) over stacked copies of the expert weights; on the CPU the per-expert loop below is the reference.
With weight_format fp8_fp4 the routed experts stay packed FP4 (`Fp4Experts`: `moe_fp4` on the GPU, the same
per-expert loop over each touched expert's dequantized weights on the CPU); with fp8 or fp8_fp4 the shared
expert's projections are FP8 (model/linear.py).

Expert parallelism (model/expert_parallel.py): a rank of a group holds only `experts` (a contiguous range of the
routed experts; the other entries of `self.experts` are empty placeholders, so parameter names keep the global
expert ids), and `ep` sends each token to the ranks that hold its experts and sums what comes back.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsepd.kernels.device import pick_backend
from sparsepd.kernels.moe import dequant_fp4, moe, moe_fp4
from sparsepd.kernels.routing import route
from sparsepd.kernels.swiglu import silu_mul
from sparsepd.model.linear import make_linear
from sparsepd.model.numerics import linear
from sparsepd.model_config import FP4_BLOCK, ModelConfig


class Expert(nn.Module):
    def __init__(self, dim: int, inter_dim: int, swiglu_limit: float, dtype: torch.dtype, fp8: bool = False):
        super().__init__()
        self.swiglu_limit = swiglu_limit
        self.w1 = make_linear(dim, inter_dim, dtype, fp8)  # gate
        self.w2 = make_linear(inter_dim, dim, dtype, fp8)  # down
        self.w3 = make_linear(dim, inter_dim, dtype, fp8)  # up

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return swiglu(x, self.w1, self.w3, self.w2, self.swiglu_limit, weights)


def swiglu(x: torch.Tensor, w1, w3, w2, limit: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """w2 · (weights · silu(min(w1·x, limit)) · clamp(w3·x, ±limit)), the products in fp32, h in x's dtype;
    w1, w3, w2 are layers (callables). Between the GEMMs `silu_mul`: one launch on GPU tensors, on the CPU its
    reference (model/numerics.py's silu: float64 rounded once)."""
    h = silu_mul(w1(x), w3(x), limit, weights)
    return w2(h.to(x.dtype))


class PackedFp4(nn.Module):
    """One routed expert's projection as the checkpoint stores it: `weight` `[out, in/2]` uint8 (packed e2m1, low
    nibble first) and `scale` `[out, in/32]` uint8 (ue8m0 exponent bytes), both views into `Fp4Experts`' stacks."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x · Wᵀ with W dequantized to x's dtype (exact): the CPU reference path."""
        return linear(x, dequant_fp4(self.weight, self.scale).to(x.dtype))


class Fp4Expert(nn.Module):
    def __init__(self, w1: PackedFp4, w2: PackedFp4, w3: PackedFp4):
        super().__init__()
        self.w1, self.w2, self.w3 = w1, w2, w3


class Fp4Experts(nn.ModuleList):
    """The routed experts in packed FP4, stacked as `moe_fp4` reads them: `w13` `[E, 2·inter, dim/2]` (W1 rows, then
    W3 rows) and `w2` `[E, dim, inter/2]` uint8, their scales `[E, 2·inter, dim/32]` and `[E, dim, inter/32]`
    uint8. Expert e's `w1`, `w3`, `w2` (`.weight`, `.scale`: the checkpoint's names and shapes) are views into
    the stacks, so the weights are held once and loads write through; moving the module moves the stacks and
    re-points the views."""

    def __init__(self, n_experts: int, dim: int, inter: int, local: range | None = None):
        local = range(n_experts) if local is None else local  # expert parallel: stacks of these experts only
        n = len(local)
        stacks = (torch.zeros(n, 2 * inter, dim // 2, dtype=torch.uint8),  # [E_local, 2·inter, dim/2]
                  torch.full((n, 2 * inter, dim // FP4_BLOCK), 127, dtype=torch.uint8),  # 2^0
                  torch.zeros(n, dim, inter // 2, dtype=torch.uint8),  # [E_local, dim, inter/2]
                  torch.full((n, dim, inter // FP4_BLOCK), 127, dtype=torch.uint8))
        super().__init__(Fp4Expert(*(PackedFp4(w, sc) for w, sc in self._views(stacks, e - local.start, inter)))
                         if e in local else nn.Module() for e in range(n_experts))
        self.inter, self.local = inter, local
        self.stacks = stacks

    @staticmethod
    def _views(stacks: tuple[torch.Tensor, ...], e: int, inter: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Expert e's (weight, scale) views for w1, w2, w3."""
        w13, s13, w2, s2 = stacks
        return [(w13[e, :inter], s13[e, :inter]), (w2[e], s2[e]), (w13[e, inter:], s13[e, inter:])]

    def _apply(self, fn, recurse: bool = True):
        self.stacks = tuple(fn(t) for t in self.stacks)
        for e in self.local:
            expert = self[e]
            views = self._views(self.stacks, e - self.local.start, self.inter)
            for layer, (weight, scale) in zip((expert.w1, expert.w2, expert.w3), views, strict=True):
                layer.weight.data, layer.scale.data = weight, scale
        return self


def gate_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x · weightᵀ in fp32 `[n, E]`. bf16 x and weight on a GPU: one bf16 GEMM accumulating and writing fp32
    (torch.mm's out_dtype: the products of bf16 values are exact in fp32, so this is the fp32 GEMM of the widened
    operands up to the order of the sums) instead of widening both and an fp32 GEMM without tensor cores (three
    launches, one reading and writing the whole weight); elsewhere, ROCm included (its out_dtype GEMM is not
    measured here), that fp32 GEMM (model/numerics.py's linear)."""
    if x.is_cuda and not torch.version.hip and x.dtype == weight.dtype == torch.bfloat16:
        return torch.mm(x.reshape(-1, x.shape[-1]), weight.t(), out_dtype=torch.float32).reshape(*x.shape[:-1], -1)
    return linear(x.float(), weight.float())


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
        """Routing weights `[n, k]` fp32 and expert ids `[n, k]` for x `[n, dim]`: after the linear, `route` (one
        launch on GPU tensors; on the CPU its reference, model/numerics.py's softplus: float64 rounded once)."""
        logits = gate_logits(x, self.weight)  # [n, E] fp32
        indices = self.tid2eid[token_ids] if self.hash else None
        return route(logits, self.bias, self.topk, self.route_scale, indices)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, experts: range | None = None):
        """experts: the routed experts this process holds (expert parallel; default all)."""
        super().__init__()
        self.local = range(cfg.n_routed_experts) if experts is None else experts
        self.ep = None  # expert parallel: model/expert_parallel.py's ExpertParallel, set by attach()
        dtype = getattr(torch, cfg.dtype)
        self.swiglu_limit = cfg.swiglu_limit
        self.gate = Gate(cfg, layer_id, dtype)
        self.fp4 = cfg.weight_format == "fp8_fp4"
        if self.fp4:
            self.experts = Fp4Experts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, self.local)
        else:  # placeholders (no parameters) for the experts other ranks hold
            self.experts = nn.ModuleList(
                Expert(cfg.dim, cfg.moe_inter_dim, cfg.swiglu_limit, dtype) if e in self.local else nn.Module()
                for e in range(cfg.n_routed_experts))
        self.shared_experts = Expert(cfg.dim, cfg.moe_inter_dim * cfg.n_shared_experts, cfg.swiglu_limit, dtype,
                                     fp8=cfg.weight_format != "plain")
        self._stacked: tuple[torch.Tensor, torch.Tensor] | None = None  # see stacked_weights

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        weights, indices = self.gate(x, token_ids)
        if self.ep is not None:  # expert parallel: the routed experts run where they are held
            y = self.ep.routed(self, x, weights, indices)
        else:
            y = self.routed(x, weights, indices)
        y += self.shared_experts(x)  # y fp32: the bf16 output is widened inside the add (one launch, not two)
        return y.to(x.dtype)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Σ over each row's routed experts, fp32 `[n, dim]`; `indices` count from `self.local.start` (the first
        expert held here) and an id outside the held ones (-1) adds nothing (expert parallel: slots another rank
        serves). `out` `[n, k, dim]` fp32 zeros: where the GPU kernels write each slot (needed when ids can be
        outside, whose slots they leave unwritten)."""
        if pick_backend("auto", x) == "triton":
            if self.fp4:
                return moe_fp4(x, weights, indices, *self.experts.stacks, self.swiglu_limit, out=out,
                               backend="triton")
            w13, w2 = self.stacked_weights()
            return moe(x, weights, indices, w13, w2, self.swiglu_limit, out=out, backend="triton")
        y = torch.zeros_like(x, dtype=torch.float32)
        for e in torch.unique(indices).tolist():
            if not 0 <= e < len(self.local):
                continue
            rows, slot = torch.where(indices == e)
            expert = self.experts[self.local.start + e]
            h = swiglu(x[rows], expert.w1, expert.w3, expert.w2, self.swiglu_limit, weights[rows, slot, None])
            y.index_add_(0, rows, h.float())
        return y

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The held routed experts' weights as `w13 [E, 2·inter, dim]` (W1 rows, then W3 rows) and `w2 [E, dim, inter]`.

        Built at the first call (the first GPU forward: run one eager forward before capturing a graph); each
        expert's parameters then become views into these tensors, so the weights are held once and the checkpoint
        names, state_dict and in-place loads keep working. Built again if the parameters were replaced since
        (e.g. by `model.to(device)`).
        """
        if self.fp4:
            raise ValueError("stacked_weights: the FP4 experts are stacked already (experts.stacks)")
        held = [self.experts[e] for e in self.local]
        first, last = held[0], held[-1]
        if (self._stacked is not None and first.w1.weight.data_ptr() == self._stacked[0].data_ptr()
                and last.w2.weight.data_ptr() == self._stacked[1][-1].data_ptr()):
            return self._stacked
        inter, dim = first.w1.weight.shape
        like = first.w1.weight
        with torch.inference_mode(False), torch.no_grad():  # plain tensors: load_state_dict copies into them
            w13 = torch.empty((len(held), 2 * inter, dim), dtype=like.dtype, device=like.device)
            w2 = torch.empty((len(held), dim, inter), dtype=like.dtype, device=like.device)
            for e, expert in enumerate(held):  # one expert at a time: the old copies go as we go
                w13[e, :inter].copy_(expert.w1.weight)
                w13[e, inter:].copy_(expert.w3.weight)
                w2[e].copy_(expert.w2.weight)
                expert.w1.weight.data = w13[e, :inter]
                expert.w3.weight.data = w13[e, inter:]
                expert.w2.weight.data = w2[e]
        self._stacked = (w13, w2)
        return self._stacked
