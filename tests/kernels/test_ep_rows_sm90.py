"""The expert-parallel exchange's kernels (kernels/ep_rows.py) compile for Hopper (sm_90) without spills, on the CPU.

A child process (the interpreter off) calls the wrappers on meta tensors at the `bench`, `v4-flash` and `v4-pro`
shapes (decode n = 1 … 256 and a prefill chunk of 8192 tokens; groups of 2 and 8 ranks), records each launch,
specialises it as Triton's launcher would on an H100/H200 and compiles it with Triton's NVIDIA backend; ptxas -v
(Triton's own) then reports each kernel's registers, stack frame and spills. The test checks every launch compiled
with no spill stores or loads and no stack frame (a spilled register would go to local memory).
"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from sm90_compile import compile_in_child, meta, needs_nvidia_backend, ptxas_rows, record_launches, spilling  # noqa: E402


def _trace_and_compile() -> list[dict]:
    """Child process: every distinct launch of pack_ep_rows and combine_ep_rows at the presets' shapes, compiled."""
    import contextlib
    from unittest import mock

    import torch

    from sparsepd.kernels import device, ep_rows
    from sparsepd.model_config import PRESETS

    launches = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(device, "triton_interpreting", lambda: True))  # meta tensors accepted
        record_launches(stack, ep_rows, launches)
        for preset in ("bench", "v4-flash", "v4-pro"):
            cfg = PRESETS[preset]
            E, k, dim = cfg.n_routed_experts, cfg.n_activated_experts, cfg.dim
            for n in (1, 2, 8, 17, 64, 256, 8192):
                for world in (2, 8):
                    ep_rows.pack_ep_rows(meta(n, dim, dtype=getattr(torch, cfg.dtype)),
                                         meta(n, k, dtype=torch.float32), meta(n, k, dtype=torch.int64), world,
                                         E // world, backend="triton")
                    ep_rows.combine_ep_rows(meta(world * n, dim, dtype=torch.float32),
                                            meta(world, n, dtype=torch.int32), backend="triton")

    return ptxas_rows(launches)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return compile_in_child(__file__, "--child")


pytestmark = needs_nvidia_backend


def test_every_launch_compiles_for_sm90_without_spills(rows):
    assert {r["kernel"] for r in rows} == {"_pack_kernel", "_combine_kernel"}
    bad = spilling(rows)
    assert not bad, f"{len(bad)} of {len(rows)} launches do not fit sm_90:\n" + "\n".join(bad)


if __name__ == "__main__" and sys.argv[1:] == ["--child"]:
    print(json.dumps(_trace_and_compile()))
