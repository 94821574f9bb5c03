"""What the sm_90 compile tests share: Triton kernels compiled for Hopper (sm_90) on the CPU, without a GPU.

A test traces a kernel's wrapper on meta tensors with its `@triton.jit` kernels replaced by `Recorder`s, specialises
each recorded launch as Triton's launcher would on an H100/H200 (`specialise`), compiles it with Triton's NVIDIA
backend (`Sm90Launch.compile`) and reads the compiler's `shared` bytes, the PTX or the TTGIR; `ptxas_figures` runs
Triton's own ptxas on the PTX for registers, stack and spills (a compiled kernel's n_regs and n_spills need a device).
Compiling runs in a child process with the interpreter off (the suite's conftest turns it on before the kernels are
imported): `compile_in_child` runs the test file as a script, which prints its rows as JSON on its last line.
Triton is imported inside the functions: this module imports where Triton has no NVIDIA backend, and those tests
skip (`needs_nvidia_backend`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def has_nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


needs_nvidia_backend = pytest.mark.skipif(not has_nvidia_backend(), reason="the installed Triton has no NVIDIA backend")


def compile_in_child(script: str, *argv: str) -> list:
    """The rows `python script *argv` prints on its last line of stdout, run with the interpreter off."""
    proc = subprocess.run([sys.executable, script, *argv], env=dict(os.environ, TRITON_INTERPRET="0"), cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"sm_90 compile check failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Recorder:
    """Stands in for a `@triton.jit` kernel: `kernel[grid](*args, **kwargs)` appends (kernel, args, kwargs) to
    `launches` instead of launching."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def record_launches(stack, module, launches: list) -> None:
    """Replaces every `@triton.jit` kernel defined in `module` by a `Recorder` until `stack` (an ExitStack) closes."""
    from unittest import mock

    from triton.runtime.jit import JITFunction
    for name, value in list(vars(module).items()):
        if isinstance(value, JITFunction) and value.__module__ == module.__name__:
            stack.enter_context(mock.patch.object(module, name, Recorder(value, launches)))


def meta(*shape: int, dtype=None):
    """An uninitialised tensor on the meta device (bf16 unless `dtype`): shapes and dtypes without memory."""
    import torch
    return torch.empty(shape, dtype=dtype or torch.bfloat16, device="meta")


def sm90_target():
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", 90, 32)


@dataclasses.dataclass
class Sm90Launch:
    """A launch as Triton's launcher specialises it for sm_90: what `triton.compile` takes."""

    kernel: object  # the JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: object  # CUDAOptions

    def constexpr_text(self) -> str:
        """The launch's constexpr parameters, `NAME=value` in parameter order, e.g. "BLOCK_M=64 BLOCK_N=128"."""
        params = self.kernel.params
        return " ".join(f"{params[p[0]].name}={v}" for p, v in sorted(self.constexprs.items())
                        if params[p[0]].is_constexpr)

    def compile(self):
        """The CompiledKernel (asm["ptx"], asm["ttgir"], metadata.shared) for sm_90."""
        import triton
        from triton.compiler import ASTSource
        return triton.compile(ASTSource(self.kernel, self.signature, self.constexprs, self.attrs),
                              target=sm90_target(), options=self.options.__dict__)


def specialise(kernel, args: tuple, kwargs: dict) -> Sm90Launch:
    """The signature, constants, attributes and options Triton's launcher derives from these arguments on sm_90
    (JITFunction.run → create_binder → _pack_args, with the CUDA backend in place of the active driver)."""
    from triton import knobs
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import create_function_from_signature
    kwargs = dict(kwargs, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    backend = CUDABackend(sm90_target())
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return Sm90Launch(kernel, signature, constexprs, attrs, options)


def ptxas_figures(ptx: str, flags: tuple[str, ...] = ("-v",)) -> dict[str, int | None]:
    """Registers a thread, stack frame, spill store and spill load bytes (None where the report has no such line)
    from Triton's ptxas run with `flags` (which include -v) on the PTX for sm_90a."""
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        log = subprocess.run([get_ptxas(90).path, *flags, "--gpu-name=sm_90a", str(src), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, check=True)
    text = log.stdout + log.stderr
    return {name: int(m.group(1)) if (m := re.search(pattern, text)) else None for name, pattern in (
        ("registers", r"Used (\d+) registers"), ("stack", r"(\d+) bytes stack frame"),
        ("spill_stores", r"(\d+) bytes spill stores"), ("spill_loads", r"(\d+) bytes spill loads"))}


def error_text(e: Exception) -> str:
    """A failed compile in one line, for the test's report of the launch that failed."""
    return f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"


def ptxas_rows(launches: list) -> list[dict]:
    """One row per distinct recorded launch (kernel, constexprs, attributes, warps): kernel, config, error (None when
    it compiled) and `ptxas_figures` of its PTX."""
    rows, seen = [], set()
    for kernel, args, kwargs in launches:
        launch = specialise(kernel, args, kwargs)
        key = (kernel.__name__, repr(sorted(launch.constexprs.items())), repr(sorted(launch.attrs.items())),
               launch.options.num_warps)
        if key in seen:
            continue
        seen.add(key)
        row = dict(kernel=kernel.__name__, config=launch.constexpr_text() + f" w{launch.options.num_warps}",
                   error=None)
        try:
            row.update(ptxas_figures(launch.compile().asm["ptx"]))
        except Exception as e:  # reported by the test with the launch that failed
            row["error"] = error_text(e)
        rows.append(row)
    return rows


def spilling(rows: list[dict]) -> list[str]:
    """The `ptxas_rows` that failed to compile, or have a stack frame or spills (or no such figure): one line each."""
    return [f"{r['kernel']} [{r['config']}]: {r['error'] or r}" for r in rows
            if r["error"] or None in (r["stack"], r["spill_stores"], r["spill_loads"])
            or r["stack"] or r["spill_stores"] or r["spill_loads"]]
