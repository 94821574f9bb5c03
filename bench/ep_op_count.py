"""Device operations of one MoE layer's expert-parallel exchange (model/expert_parallel.py's `ExpertParallel.routed`),
counted on the CPU: each rank of a gloo group of W runs one routed() call on the `bench` preset's routing shapes
(dim 4096 bf16, 16 experts, top-6) and every aten op it dispatches is recorded (a TorchDispatchMode), the experts'
own work (`MoE.routed`, replaced here by a stand-in of the same output) excluded. An op is counted as a device
operation unless it only makes a view or allocates (those launch nothing on a GPU); collectives and Triton
launches are counted apart. On a GPU each device operation is one kernel (a node of the captured CUDA graph).

    python3 -P bench/ep_op_count.py [--ranks 1,2] [--tokens 1,64,256] [--exchange reference,triton]

`--exchange triton` runs the fused kernels (kernels/ep_rows.py) in the Triton interpreter: set TRITON_INTERPRET=1.
Prints one markdown row per (W, tokens, exchange): device ops, collectives, Triton launches, and per step of the
`bench` preset (× its MoE layers).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections import Counter

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from sparsepd.model.expert_parallel import ExpertLayout, ExpertParallel
from sparsepd.model_config import get_preset

# aten ops that make a view or allocate: no kernel on a GPU
NO_KERNEL = {"view", "_unsafe_view", "t", "transpose", "slice", "select", "unsqueeze", "squeeze", "expand", "alias",
             "as_strided", "detach", "reshape", "empty", "empty_strided", "new_empty", "new_empty_strided",
             "lift_fresh", "split", "unbind", "permute", "_reshape_alias", "sym_size", "sym_stride", "sym_numel",
             "is_same_size", "_has_compatible_shallow_copy_type"}


class OpCounter(TorchDispatchMode):
    """Records the aten ops dispatched while `recording` (paused around the experts and Triton launches)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.recording = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.recording:
            name = func.__name__.split(".")[0]
            self.ops[name if func.namespace == "aten" else f"{func.namespace}.{name}"] += 1
        return func(*args, **(kwargs or {}))

    def split(self) -> tuple[int, int, list[str]]:
        """(device ops, collectives, names of the device ops)."""
        device, collectives, names = 0, 0, []
        for name, count in self.ops.items():
            if name.startswith("c10d."):
                collectives += count
            elif name not in NO_KERNEL:
                device += count
                names += [name] * count
        return device, collectives, sorted(names)


class ExpertsStandIn:
    """`MoE.routed`'s output shape and dtype (fp32 [R, dim]) without its work: the exchange is what is counted."""

    def __init__(self, counter: OpCounter):
        self.counter = counter

    def routed(self, x, weights, indices, out=None):
        self.counter.recording = False
        try:
            return torch.ones(x.shape, dtype=torch.float32)
        finally:
            self.counter.recording = True


def count_triton_launches(counter: OpCounter) -> Counter[str]:
    """Wrap kernels/ep_rows.py's Triton kernels: each launch counted, the interpreter's own torch ops not."""
    from sparsepd.kernels import ep_rows
    launches: Counter[str] = Counter()

    class Counted:
        def __init__(self, name: str, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launches[self.name] += 1
                counter.recording = False
                try:
                    return self.kernel[grid](*args, **kwargs)
                finally:
                    counter.recording = True
            return run

    for name in ("_pack_kernel", "_combine_kernel"):
        setattr(ep_rows, name, Counted(name, getattr(ep_rows, name)))
    return launches


def rank_main(rank: int, world: int, port: int, tokens: list[int], exchanges: list[str], queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = get_preset("bench")
    counter = OpCounter()
    launches = count_triton_launches(counter) if "triton" in exchanges else Counter()
    moe_layers = cfg.n_layers
    for exchange in exchanges:
        ep = ExpertParallel(ExpertLayout(rank, world, cfg.n_routed_experts), dist.group.WORLD, dist.group.WORLD,
                            backend=exchange)
        for n in tokens:
            gen = torch.Generator().manual_seed(n)
            x = torch.randn(n, cfg.dim, generator=gen).to(torch.bfloat16)
            indices = torch.rand(n, cfg.n_routed_experts, generator=gen).argsort(1)[:, :cfg.n_activated_experts]
            weights = torch.rand(n, cfg.n_activated_experts, generator=gen)
            ep.begin_forward(n)
            counter.ops.clear()
            launches.clear()
            with counter:
                ep.routed(ExpertsStandIn(counter), x, weights, indices)
            device, collectives, names = counter.split()
            if rank == 0:
                queue.put((world, n, exchange, device, collectives, sum(launches.values()), moe_layers,
                           " ".join(f"{k}×{v}" if v > 1 else k for k, v in sorted(Counter(names).items())),
                           " ".join(sorted(launches))))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--tokens", default="1,64,256")
    ap.add_argument("--exchange", default="reference")
    args = ap.parse_args()
    exchanges = args.exchange.split(",")
    if "triton" in exchanges and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--exchange triton on the CPU needs TRITON_INTERPRET=1")
    tokens = [int(t) for t in args.tokens.split(",")]
    ctx = mp.get_context("spawn")
    rows = []
    for world in (int(w) for w in args.ranks.split(",")):
        queue = ctx.Queue()
        mp.start_processes(rank_main, args=(world, free_port(), tokens, exchanges, queue), nprocs=world,
                           start_method="spawn")
        rows += [queue.get() for _ in range(len(tokens) * len(exchanges))]
    print("| W | tokens | exchange | device ops | collectives | Triton launches | per step (× MoE layers) | ops |")
    print("|---|---|---|---|---|---|---|---|")
    for world, n, exchange, device, collectives, triton_launches, layers, names, kernels in rows:
        per_step = (device + collectives + triton_launches) * layers
        print(f"| {world} | {n} | {exchange} | {device} | {collectives} | {triton_launches} | {per_step} ({layers}) "
              f"| {names} {kernels} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
