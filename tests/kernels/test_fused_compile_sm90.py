"""The decode step's fused elementwise kernels compile for Hopper (sm_90) without spills, on the CPU.

kernels/rms_norm.py, kernels/entry_rows.py, kernels/swiglu.py and kernels/routing.py replace PyTorch launch chains
of the decode step; kernels/argmax.py is its greedy draw. A child process (the interpreter off) calls their wrappers
on meta tensors at the `bench`, `v4-flash` and `v4-pro` shapes (n = 1 … 256 tokens and a prefill chunk of 8192; the
draw at n ≤ 256), records each launch, specialises it as Triton's launcher would on an H100/H200 and compiles it with
Triton's NVIDIA backend; ptxas -v (Triton's own) reports each kernel's registers, stack frame and spills. Every
launch must compile with no spills and no stack frame.
"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from sm90_compile import compile_in_child, meta, needs_nvidia_backend, ptxas_rows, record_launches, spilling  # noqa: E402

KERNELS = {"_rms_norm_kernel", "_entry_rows_kernel", "_silu_mul_kernel", "_route_kernel", "_chunk_max_kernel",
           "_merge_kernel"}


def _trace_and_compile() -> list[dict]:
    """Child process: every distinct launch of the five wrappers at the presets' shapes, compiled."""
    import contextlib
    from unittest import mock

    import torch

    from sparsepd.kernels import argmax, entry_rows, rms_norm, routing, swiglu
    from sparsepd.model_config import PRESETS

    launches = []
    f32, i32, i64 = torch.float32, torch.int32, torch.int64
    with contextlib.ExitStack() as stack:
        for module in (rms_norm, entry_rows, routing, swiglu, argmax):  # meta tensors go to Triton (recorded, not run)
            stack.enter_context(mock.patch.object(module, "pick_backend", lambda backend, *t: "triton"))
            record_launches(stack, module, launches)
        for preset in ("bench", "v4-flash", "v4-pro"):
            cfg = PRESETS[preset]
            act = getattr(torch, cfg.dtype)
            E, k, inter = cfg.n_routed_experts, cfg.n_activated_experts, cfg.moe_inter_dim * cfg.n_shared_experts
            rpp = cfg.page_size // 4
            for n in (1, 8, 64, 256, 8192):
                for width in (cfg.dim, cfg.q_lora_rank, cfg.head_dim):
                    rms_norm.rms_norm(meta(n, width, dtype=act), meta(width, dtype=act), cfg.norm_eps)
                entry_rows.entry_rows(meta(n, cfg.index_topk, dtype=i64), meta(256, 512, dtype=i32),
                                      meta(n, dtype=i32), rpp, 0)
                swiglu.silu_mul(meta(n, inter, dtype=act), meta(n, inter, dtype=act), cfg.swiglu_limit)
                routing.route(meta(n, E, dtype=f32), meta(E, dtype=f32), k, cfg.route_scale)
                routing.route(meta(n, E, dtype=f32), None, k, cfg.route_scale, meta(n, k, dtype=i64))
                if n <= 256:
                    argmax.argmax_rows(meta(n, cfg.vocab_size, dtype=f32))  # the greedy draw

    return ptxas_rows(launches)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return compile_in_child(__file__, "--child")


pytestmark = needs_nvidia_backend


def test_every_launch_compiles_for_sm90_without_spills(rows):
    assert {r["kernel"] for r in rows} == KERNELS
    bad = spilling(rows)
    assert not bad, f"{len(bad)} of {len(rows)} launches do not fit sm_90:\n" + "\n".join(bad)


if __name__ == "__main__" and sys.argv[1:] == ["--child"]:
    print(json.dumps(_trace_and_compile()))
