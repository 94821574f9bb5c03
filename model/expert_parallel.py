"""Expert parallelism: the routed experts split across the ranks of a group, each token sent to the ranks that
hold its experts and the results summed back (docs/DESIGN.md §9, "Multi-GPU").

Layout: with W ranks and E routed experts (E a multiple of W), rank r holds experts [r·E/W, (r+1)·E/W) of every
MoE layer, hash-routed layers alike (the gate, replicated, picks global ids; the table `tid2eid` too). Everything
else is replicated: each rank runs attention, the gates and the shared expert on its own requests' tokens (data
parallel attention: engine/group.py).

One MoE layer on rank r with n_r tokens (every rank runs the same layers in the same order, so the collectives
pair up; a rank without tokens takes part with n_r = 0, `idle_forward`):

1. dispatch: token t goes to rank p when one of its k experts lives there, at most once per rank. The send buffer
   holds W blocks of n_r rows (block p: the tokens for rank p, in token order, then padding), each row the bytes of
   x, its k expert ids local to p (int32, -1 for a slot another rank serves, and on padding rows) and its k routing
   weights (fp32): one all_to_all_single of bytes per layer for the dispatch, one for the combine. The
   split sizes are therefore known on every host without looking at the routing — rank q sends n_q rows to each
   rank — so nothing waits on the device: the counts travel inside the buffers (a padding row is all -1 ids and
   computes nothing), and the token counts n_q are exchanged once per forward on the host (`begin_forward`).
   The buffer is built by one Triton launch on GPU tensors (kernels/ep_rows.py; its torch reference, ~30 small
   ops, on the CPU or with backend="reference": bench/ep_op_count.py counts a layer's).
2. each rank runs its held experts over the Σ_q n_q rows it received (`MoE.routed`, ids outside its range add
   nothing), fp32 [Σ n_q, dim], reading x, the ids and the weights as views of the received rows.
3. combine: the rows go back the way they came (all_to_all_single with the splits swapped); token t sums the rows
   of the ranks it was sent to, in rank order (one Triton launch on GPU tensors).

Cost of the padding: each rank sends W·n_r rows where the tokens need Σ_t |ranks of t| ≤ n_r·min(k, W); with
k ≥ W (6 of 256 experts over 2-8 ranks) nearly every token goes to every rank and the padding is small.
Numerics: with W = 1 the result is bit for bit the plain MoE's (the same rows in the same order, the combine returns
each row as is); with W > 1 the fp32 sum of a token's expert outputs is grouped by rank ((h_a + h_b) + (h_c + h_d)
instead of ((h_a + h_b) + h_c) + h_d), a rounding difference of a few fp32 ulps of the sum; the Triton and torch
paths give the same bits (the same additions in the same order).
Known limits: the per-forward host exchange of n_r makes a forward with W > 1 uncapturable in a CUDA graph as it
stands (the workers turn graphs off for W > 1); the combine travels in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from sparsepd.kernels.device import Backend
from sparsepd.kernels.ep_rows import combine_ep_rows, ep_row_fields, pack_ep_rows
from sparsepd.model.transformer import Transformer


@dataclass(frozen=True)
class ExpertLayout:
    """Which routed experts a rank holds: a contiguous range of E/W."""

    rank: int
    world_size: int
    n_experts: int

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside the group of {self.world_size}")
        if self.n_experts % self.world_size:
            raise ValueError(f"{self.n_experts} routed experts cannot be split evenly over {self.world_size} ranks "
                             "(--ep must divide the expert count)")

    @property
    def per_rank(self) -> int:
        return self.n_experts // self.world_size

    @property
    def held(self) -> range:
        return range(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)


class ExpertParallel:
    """The group's routed experts for one process: the layout, the device group that carries the rows and the
    host (gloo) group that carries each forward's token counts. `forwards` counts the forwards this rank took
    part in (the engine's lockstep: engine/group.py)."""

    def __init__(self, layout: ExpertLayout, device_group, host_group, backend: Backend = "auto"):
        self.layout, self.device_group, self.host_group = layout, device_group, host_group
        self.backend = backend  # the exchange's packing and combine (kernels/ep_rows.py): Triton on GPU tensors
        self.tokens: list[int] = [0] * layout.world_size  # this forward's token count on each rank
        self.forwards = 0

    def begin_forward(self, num_tokens: int) -> bool:
        """Exchange this forward's token counts (host only: no device sync); whether any rank has tokens."""
        self.forwards += 1
        if self.layout.world_size == 1:
            self.tokens = [num_tokens]
            return num_tokens > 0
        counts = torch.zeros(self.layout.world_size, dtype=torch.int64)
        counts[self.layout.rank] = num_tokens
        dist.all_reduce(counts, group=self.host_group)
        self.tokens = counts.tolist()
        return any(self.tokens)

    def routed(self, moe, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Σ of each token's routed experts, fp32 `[n, dim]`, wherever they are held (module docstring)."""
        W, k = self.layout.world_size, indices.shape[1]
        send, pos = pack_ep_rows(x, weights.float(), indices, W, self.layout.per_rank, backend=self.backend)
        recv = self._dispatch(send)  # [R, row bytes]
        recv_x, ids, recv_w = ep_row_fields(recv, x.shape[1], x.dtype, k)  # views: [R, dim], [R, k] int32, [R, k]
        # the GPU kernels leave the slots of ids outside this rank's range unwritten: zeros there (none with W = 1)
        out = torch.zeros(ids.shape[0], k, x.shape[1], dtype=torch.float32, device=x.device) \
            if x.is_cuda and W > 1 else None
        y_held = moe.routed(recv_x, recv_w, ids, out=out)  # [R, dim] fp32
        return combine_ep_rows(self._combine(y_held, x.shape[0]), pos, backend=self.backend)  # [n, dim]

    def _dispatch(self, send: torch.Tensor) -> torch.Tensor:
        """Block p of `send` (n_r rows) to rank p; from every rank q its n_q rows for this one, in rank order."""
        n = self.tokens[self.layout.rank]
        recv = send.new_empty(sum(self.tokens), send.shape[1])
        dist.all_to_all_single(recv, send, self.tokens, [n] * self.layout.world_size, group=self.device_group)
        return recv

    def _combine(self, y_held: torch.Tensor, n: int) -> torch.Tensor:
        back = y_held.new_empty(self.layout.world_size * n, y_held.shape[1])
        dist.all_to_all_single(back, y_held.contiguous(), [n] * self.layout.world_size, self.tokens,
                               group=self.device_group)
        return back


def attach(model: Transformer, ep: ExpertParallel) -> Transformer:
    """Make the model's MoE layers expert parallel (the model holds `ep.layout.held` of every layer's experts)."""
    for i, layer in enumerate(model.layers):
        if layer.ffn.local != ep.layout.held:
            raise ValueError(f"layer {i} holds experts {layer.ffn.local}, the layout gives rank {ep.layout.rank} "
                             f"{ep.layout.held}")
        layer.ffn.ep = ep
    model.ep = ep
    return model


@torch.inference_mode()
def idle_forward(model: Transformer) -> None:
    """This rank's part in a forward where it has no tokens: every MoE layer's exchange, with none of its own
    (its experts still serve the other ranks' tokens). Nothing runs when no rank has tokens."""
    ep = model.ep
    if not ep.begin_forward(0):
        return
    device, cfg = model.device, model.cfg
    x = torch.zeros(0, cfg.dim, dtype=getattr(torch, cfg.dtype), device=device)
    weights = torch.zeros(0, cfg.n_activated_experts, device=device)
    indices = torch.zeros(0, cfg.n_activated_experts, dtype=torch.int64, device=device)
    for layer in model.layers:
        ep.routed(layer.ffn, x, weights, indices)
