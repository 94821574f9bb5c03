"""The MoE gate's routing after its linear in one launch (docs/dsv4-spec.md "Block, MoE and head", the gate).

For a token's gate logits l [E] (fp32, = x · W_gateᵀ), bias b [E] and k experts a token:

    s        = sqrt(softplus(l)),  softplus(l) = l if l > 20 else log1p(exp(l))          (fp32)
    indices  = the first k of a stable descending sort of s + b (equal keys: lower expert first), or, in a hash
               layer, the given ids (tid2eid[token_id])
    weights  = s[indices] / Σ s[indices] · route_scale                                     (fp32)

That is model/moe.py's `Gate.forward` after the linear; on a GPU it replaces 8 launches a layer (softplus, sqrt,
+ bias, sort, gather, sum, division, × route_scale; 7 in a hash layer, whose tid2eid lookup stays in torch).

API (`backend` as in kernels/device.py):
    route(logits, bias, topk, route_scale, indices=None, *, out=None, backend="auto") -> (weights, indices)
    route_ref(logits, bias, topk, route_scale, indices=None, *, out=None): plain PyTorch, the CPU path.
logits [n, E] fp32 with a contiguous last dim; bias [E] fp32 or None; indices None (top-k) or [n, topk]
int32/int64 ids in [0, E) (hash; not checked: that needs a host sync); out None or (weights [n, topk] fp32,
indices [n, topk] int64), written and returned. Returns weights fp32 and indices int64 [n, topk].
Limits (Triton): E ≤ 1024 (a row lives in one program's registers; the presets have 8 … 384), topk ≤ 16.

Kernel: one program a token. Top-k is topk rounds of "the largest key not taken yet, the lowest expert id among
equal ones": the order of a stable descending sort, ties included. NaN keys (NaN logits) are ranked with −inf
ones, where torch's sort puts them first. The normalising sum adds the chosen scores in slot order, one at a
time; torch's sum has its own order (on the CPU the same for k = 8, not for k = 6; its CUDA reduction's order is
not checked here: no GPU), so the weights may differ from torch's by a few fp32 ulps, ≤ (k + 1)·eps relative
(tests/kernels/test_routing.py), the ids not at all.
Compiled, softplus and sqrt are fp32 with the device libm's expf and log1pf (libdevice / ocml) and an IEEE sqrt:
torch's CUDA expressions, but for logits below ln 2^-126 ≈ −87.3: there softplus is subnormal, which Triton's
libdevice (linked flush-to-zero) flushes to 0 where torch keeps it; such an expert's weight is below
2^-63 · route_scale / Σ, nothing against the others' (measured on an H100: 0 for 5e-23).
In the interpreter (no libdevice there) softplus is evaluated in float64 and rounded once, as the CPU reference
does (model/numerics.py `softplus`, batch invariance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra import libdevice

from sparsepd.kernels.device import Backend, pick_backend, triton_interpreting

MAX_EXPERTS = 1024
MAX_TOPK = 16


@triton.jit
def _score(logit, INTERPRET: tl.constexpr):
    """sqrt(softplus(logit)) in fp32; softplus in float64 rounded once in the interpreter (log1p as
    log(u)·e/(u − 1), u = 1 + e: exact to a few float64 ulps, which the rounding to fp32 hides)."""
    if INTERPRET:
        x = logit.to(tl.float64)
        e = tl.exp(x)
        u = 1.0 + e
        log1p = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
        sp = tl.where(x > 20.0, x, log1p).to(tl.float32)
    else:
        sp = tl.where(logit > 20.0, logit, libdevice.log1p(libdevice.exp(logit)))
    return tl.sqrt_rn(sp)


@triton.jit
def _route_kernel(
    logits_ptr, bias_ptr, ids_ptr, w_out_ptr, ids_out_ptr,
    num_experts, s_logits, s_ids_t, s_ids_k, s_w_out, s_ids_out, route_scale,
    TOPK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    HASH: tl.constexpr, BIAS: tl.constexpr, INTERPRET: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.arange(0, BLOCK_K)
    slot_ok = slot < TOPK
    row = logits_ptr + t * s_logits
    if HASH:
        ids = tl.load(ids_ptr + t * s_ids_t + slot * s_ids_k, mask=slot_ok, other=0).to(tl.int64)
        w = _score(tl.load(row + ids, mask=slot_ok, other=0.0), INTERPRET)
        total = tl.sum(tl.where(slot == 0, w, 0.0))
        for r in tl.static_range(1, TOPK):
            total += tl.sum(tl.where(slot == r, w, 0.0))  # in slot order, one at a time (module docstring)
    else:
        e = tl.arange(0, BLOCK_E)
        taken = e >= num_experts  # padding is never picked
        scores = _score(tl.load(row + e, mask=~taken, other=0.0), INTERPRET)
        key = scores
        if BIAS:
            key = scores + tl.load(bias_ptr + e, mask=~taken, other=0.0)
        key = tl.where(key != key, float("-inf"), key)
        ids = tl.zeros([BLOCK_K], dtype=tl.int64)
        w = tl.zeros([BLOCK_K], dtype=tl.float32)
        total = 0.0
        for r in tl.static_range(TOPK):
            best = tl.max(tl.where(taken, float("-inf"), key), axis=0)
            pick = tl.min(tl.where((key == best) & ~taken, e, BLOCK_E), axis=0)  # the lowest id among equal keys
            score = tl.max(tl.where(e == pick, scores, float("-inf")), axis=0)
            ids = tl.where(slot == r, pick.to(tl.int64), ids)
            w = tl.where(slot == r, score, w)
            total += score
            taken = taken | (e == pick)
    w = tl.math.div_rn(w, total) * route_scale
    tl.store(w_out_ptr + t * s_w_out + slot, w, mask=slot_ok)
    tl.store(ids_out_ptr + t * s_ids_out + slot, ids, mask=slot_ok)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _describe(t) -> str:
    return f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"


def _check(logits, bias, topk, indices, out) -> None:
    _need(isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.dtype == torch.float32
          and logits.stride(-1) == 1, f"logits must be an fp32 [n, E] tensor with a contiguous last dim, got "
          f"{_describe(logits)}")
    n, num_experts = logits.shape
    _need(isinstance(topk, int) and 1 <= topk <= num_experts, f"topk must be an int in [1, E={num_experts}], "
          f"got {topk!r}")
    _need(bias is None or (isinstance(bias, torch.Tensor) and bias.shape == (num_experts,)
                           and bias.dtype == torch.float32 and bias.is_contiguous() and bias.device == logits.device),
          f"bias must be None or a contiguous fp32 [{num_experts}] tensor on {logits.device}, got {_describe(bias)}")
    _need(indices is None or (isinstance(indices, torch.Tensor) and indices.shape == (n, topk)
                              and indices.dtype in (torch.int32, torch.int64) and indices.device == logits.device),
          f"indices must be None or int32/int64 [{n}, {topk}] on {logits.device}, got {_describe(indices)}")
    if out is not None:
        ok = isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)
        _need(ok and out[0].shape == (n, topk) and out[0].dtype == torch.float32 and out[1].shape == (n, topk)
              and out[1].dtype == torch.int64 and all(t.device == logits.device and t.stride(-1) == 1 for t in out),
              f"out must be (fp32, int64) [{n}, {topk}] tensors on {logits.device} with a contiguous last dim, got "
              f"{[_describe(t) for t in out] if isinstance(out, tuple) else type(out).__name__}")


def route(logits: torch.Tensor, bias: torch.Tensor | None, topk: int, route_scale: float,
          indices: torch.Tensor | None = None, *, out: tuple[torch.Tensor, torch.Tensor] | None = None,
          backend: Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights fp32 and expert ids int64, both [n, topk], from the gate's logits (module docstring)."""
    _check(logits, bias, topk, indices, out)
    tensors = [logits] + [t for t in (bias, indices) if t is not None] + (list(out) if out is not None else [])
    if pick_backend(backend, *tensors) == "reference":
        return route_ref(logits, bias, topk, route_scale, indices, out=out)
    n, num_experts = logits.shape
    _need(num_experts <= MAX_EXPERTS and topk <= MAX_TOPK,
          f"the Triton gate takes E ≤ {MAX_EXPERTS} and topk ≤ {MAX_TOPK}, got E={num_experts}, topk={topk}")
    if out is None:
        out = (torch.empty((n, topk), dtype=torch.float32, device=logits.device),
               torch.empty((n, topk), dtype=torch.int64, device=logits.device))
    if n == 0:
        return out
    block_e = 16 if indices is not None else max(16, triton.next_power_of_2(num_experts))  # unused in hash layers
    _route_kernel[(n,)](
        logits, bias if bias is not None else logits, indices if indices is not None else out[1], *out,
        num_experts, logits.stride(0), *(indices.stride() if indices is not None else (0, 0)),
        out[0].stride(0), out[1].stride(0), float(route_scale),
        TOPK=topk, BLOCK_E=block_e, BLOCK_K=max(2, triton.next_power_of_2(topk)),
        HASH=indices is not None, BIAS=bias is not None, INTERPRET=triton_interpreting(),
        num_warps=1 if block_e <= 128 else 4,
    )
    return out


def route_ref(logits: torch.Tensor, bias: torch.Tensor | None, topk: int, route_scale: float,
              indices: torch.Tensor | None = None, *,
              out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """route in plain PyTorch: model/moe.py's Gate after the linear, softplus as model/numerics.py's (fp32 on CUDA,
    float64 rounded once to fp32 elsewhere)."""
    sp = F.softplus(logits) if logits.is_cuda else F.softplus(logits.double()).to(torch.float32)
    scores = sp.sqrt()
    if indices is None:
        biased = scores if bias is None else scores + bias
        indices = torch.sort(biased, dim=-1, descending=True, stable=True).indices[:, :topk]
    weights = scores.gather(1, indices.to(torch.int64))
    weights = weights / weights.sum(-1, keepdim=True) * route_scale
    indices = indices.to(torch.int64)
    if out is None:
        return weights, indices
    out[0].copy_(weights)
    out[1].copy_(indices)
    return out
