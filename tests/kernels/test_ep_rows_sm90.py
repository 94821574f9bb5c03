"""The expert-parallel exchange's kernels (kernels/ep_rows.py) compile for Hopper (sm_90) without spills, on the CPU.

A child process (the interpreter off) calls the wrappers on meta tensors at the `bench`, `v4-flash` and `v4-pro`
shapes (decode n = 1 … 256 and a prefill chunk of 8192 tokens; groups of 2 and 8 ranks), records each launch,
specialises it as Triton's launcher would on an H100/H200 and compiles it with Triton's NVIDIA backend; ptxas -v
(Triton's own) then reports each kernel's registers, stack frame and spills. The test checks every launch compiled
with no spill stores or loads and no stack frame (a spilled register would go to local memory).
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def has_cuda_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


def _trace_and_compile() -> list[dict]:
    """Child process: every distinct launch of pack_ep_rows and combine_ep_rows at the presets' shapes, compiled."""
    import contextlib
    from unittest import mock

    import torch
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend, get_ptxas
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from sparsepd.kernels import device, ep_rows
    from sparsepd.model_config import PRESETS

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(shape, dtype=dtype, device="meta")

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(device, "triton_interpreting", lambda: True))  # meta tensors accepted
        for name, value in list(vars(ep_rows).items()):
            if isinstance(value, JITFunction):
                stack.enter_context(mock.patch.object(ep_rows, name, Recorder(value)))
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

    target = GPUTarget("cuda", 90, 32)
    backend = CUDABackend(target)
    ptxas = get_ptxas(90).path
    rows, seen = [], set()
    for kernel, args, kwargs in launches:
        kwargs = dict(kwargs, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
        if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
            kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
        key = (kernel.__name__, repr(sorted(constexprs.items())), repr(sorted(attrs.items())), options.num_warps)
        if key in seen:
            continue
        seen.add(key)
        config = " ".join(f"{kernel.params[p[0]].name}={v}" for p, v in sorted(constexprs.items())
                          if kernel.params[p[0]].is_constexpr) + f" w{options.num_warps}"
        row = dict(kernel=kernel.__name__, config=config, error=None)
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "k.ptx"
                src.write_text(compiled.asm["ptx"])
                log = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", str(src), "-o", str(Path(tmp) / "k.o")],
                                     capture_output=True, text=True, check=True).stderr
            figures = {name: int(m.group(1)) if (m := re.search(pattern, log)) else None for name, pattern in (
                ("registers", r"Used (\d+) registers"), ("stack", r"(\d+) bytes stack frame"),
                ("spill_stores", r"(\d+) bytes spill stores"), ("spill_loads", r"(\d+) bytes spill loads"))}
            row.update(figures)
        except Exception as e:  # reported by the test with the launch that failed
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, __file__, "--child"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, f"sm_90 compile check failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


pytestmark = pytest.mark.skipif(not has_cuda_backend(), reason="the installed Triton has no NVIDIA backend")


def test_every_launch_compiles_for_sm90_without_spills(rows):
    assert {r["kernel"] for r in rows} == {"_pack_kernel", "_combine_kernel"}
    bad = [f"{r['kernel']} [{r['config']}]: {r['error'] or r}" for r in rows
           if r["error"] or None in (r["stack"], r["spill_stores"], r["spill_loads"])
           or r["stack"] or r["spill_stores"] or r["spill_loads"]]
    assert not bad, f"{len(bad)} of {len(rows)} launches do not fit sm_90:\n" + "\n".join(bad)


if __name__ == "__main__" and sys.argv[1:] == ["--child"]:
    print(json.dumps(_trace_and_compile()))
