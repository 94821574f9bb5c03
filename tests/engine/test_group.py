"""A worker group over gloo on the CPU (engine/group.py, model/expert_parallel.py): W ranks as W real processes
on the `tiny` preset (8 routed experts split W ways, its hash layer among the split layers); each rank's logits
and greedy tokens against the single-process reference on the same requests, with the last rank holding no
request (it runs empty steps so that the collectives pair up).

Bound: with W = 1 the logits are bit for bit the reference's; with W > 1 a token's routed-expert sum is grouped by
rank (model/expert_parallel.py), a reordering of fp32 additions: |Δ| ≤ 1e-5 · max(1, max |reference logit|), and
the greedy tokens equal.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RANK_SCRIPT = Path(__file__).with_name("group_rank.py")
TIMEOUT_S = 900  # gloo on a shared 2-core machine: generous, the shapes are small


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(world: int, tmp_path: Path, *extra: str) -> list[dict]:
    port = free_port()
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, str(RANK_SCRIPT), "--rank", str(r), "--world", str(world),
                               "--port", str(port), "--out", str(outs[r]), *extra],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    try:
        logs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} exited {p.returncode}:\n{logs[r][-3000:]}"
    return [torch.load(o) for o in outs]


@pytest.mark.parametrize("world", [1, 2, pytest.param(4, marks=pytest.mark.slow)])
def test_group_matches_single_process(world, tmp_path):
    check_group(run_group(world, tmp_path), world)


@pytest.mark.parametrize("world", [1, 2, pytest.param(4, marks=pytest.mark.slow)])
def test_group_with_the_fused_exchange(world, tmp_path):
    """The row exchange through its Triton kernels (kernels/ep_rows.py, the GPU path) in the interpreter: the same
    assertions (the rest of the model on its CPU path)."""
    check_group(run_group(world, tmp_path, "--exchange", "triton"), world)


def check_group(results: list[dict], world: int) -> None:
    for rank, res in enumerate(results):
        per = 8 // world
        held = {int(n.split(".")[4]) for n in res["held"]}
        assert held == set(range(rank * per, (rank + 1) * per)), f"rank {rank} holds experts {sorted(held)}"
        assert res["tokens"] == res["ref_tokens"], f"rank {rank}: {res['tokens']} vs {res['ref_tokens']}"
        assert all(len(t) > 0 for t in res["tokens"])
        assert res["idle"], f"rank {rank}: pools not back to full"
        for i, (got, ref) in enumerate(zip(res["logits"], res["ref_logits"], strict=True)):
            if world == 1:
                assert torch.equal(got, ref), f"rank {rank} forward {i}: max |Δ| {(got - ref).abs().max():.3g}"
            else:
                bound = 1e-5 * max(1.0, ref.abs().max().item())
                worst = (got - ref).abs().max().item()
                assert worst <= bound, f"rank {rank} forward {i}: max |Δ| {worst:.3g} > {bound:.3g}"
    # the last rank of a group had no request: it took part in every forward of the others with empty ones
    assert results[-1]["forwards"] == results[0]["forwards"]
    if world > 1:
        assert results[-1]["tokens"] == [] and results[-1]["ticks"] == results[0]["ticks"]
