"""The quantized-weight launches of bench/bench_quant.py's decode cases, compiled for H200 (sm_90) on the CPU.

For each case (V4-Flash projection shapes at M = 1 … 256, the grouped output projection, the FP4 experts at
T = 1 … 256) the real wrappers are called on meta tensors with the device queries answered for an H200 (132 SMs),
every launch is recorded with its grid, and each distinct launch is compiled by Triton's NVIDIA backend (its
ptxas) for sm_90. Printed per launch: the grid and programs an SM; registers, spilled bytes and stack (cuobjdump
-res-usage); shared memory; the blocks an SM can hold (registers, shared memory, warps) and so the waves; the
weight bytes a program reads; SASS figures (wgmma, async copies into shared memory, TMA loads, global loads).
No GPU is needed; the times are for `bench_quant.py` on one.

    python3 -P bench/quant_sm90_report.py [--variants] [--only TEXT] [--out FILE.md]

--variants also compiles the candidate configs bench_quant.py --sweep times at decode.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
NUM_SMS = 132
SM_REGS, SM_SHARED, SM_WARPS, SM_BLOCKS = 65536, 228 * 1024, 64, 32  # sm_90 limits an SM
BLOCK_SHARED_RESERVED = 1024  # the driver's shared memory reserved a block


@dataclass(slots=True)
class Launch:
    case: str
    kernel: object  # JITFunction
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def _h200(sink: Callable[[object, tuple, tuple, dict], None]) -> Iterator[None]:
    """fp8_gemm and moe as they behave on an H200, every kernel launch going to `sink` instead of a device."""
    from triton.runtime.jit import JITFunction

    from sparsepd.kernels import device, fp8_gemm, moe

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: sink(self.kernel, tuple(grid), args, kwargs)

    with contextlib.ExitStack() as stack:
        def patch(obj, name, value):
            stack.enter_context(mock.patch.object(obj, name, value))
        patch(device, "triton_interpreting", lambda: True)  # backend="triton" accepts meta tensors
        patch(fp8_gemm, "_num_sms", lambda dev: NUM_SMS)
        patch(fp8_gemm, "_fp8_dot_supported", lambda dev: True)
        patch(fp8_gemm, "_pdl_supported", lambda dev: True)
        patch(moe, "_num_sms", lambda dev: NUM_SMS)
        real_format = moe._weight_format  # "ptx" checks for a CUDA device: meta tensors stand in for one
        patch(moe, "_weight_format", lambda fp4, x, c: 3 if fp4 and c.fp4_unpack == "ptx" and c.block_m <= 32
              else real_format(fp4, x, c))
        patch(fp8_gemm, "triton_interpreting", lambda: False)  # the hardware's FP8 cast, as on the GPU
        for module in (fp8_gemm, moe):
            for name, value in list(vars(module).items()):
                if isinstance(value, JITFunction) and value.__module__ == module.__name__:
                    patch(module, name, Recorder(value))
        yield


def _meta(*shape, dtype=None):
    import torch
    return torch.empty(shape, dtype=dtype or torch.bfloat16, device="meta")


def trace(variants: bool) -> list[Launch]:
    """The decode cases of bench_quant.py (its shapes and default configs; with `variants` its candidates too)."""
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    import bench_quant as bq

    from sparsepd.kernels import fp8_gemm, moe

    launches: list[Launch] = []
    case = ""
    sink = lambda kernel, grid, args, kwargs: launches.append(Launch(case, kernel, grid, args, kwargs))  # noqa: E731
    f32, u8 = torch.float32, torch.uint8
    fp8 = torch.float8_e4m3fn
    with _h200(sink):
        for name, (N, K) in bq.PROJECTIONS.items():
            for M in bq.DECODE_M:
                configs = list(dict.fromkeys(v.config for v in bq.fp8_variants(M, N, K, NUM_SMS))) if variants \
                    else [fp8_gemm.default_fp8_config(M, N, K, NUM_SMS)]
                for i, config in enumerate(configs):
                    case = f"fp8 {name} M={M}" + ("" if i == 0 else f" cand{i}")
                    fp8_gemm.fp8_linear(_meta(M, K), _meta(N, K, dtype=fp8), _meta(-(-N // 128), -(-K // 128),
                                        dtype=f32), backend="triton", config=config)
        for name, (N, K, G) in bq.GROUPED.items():
            for M in bq.DECODE_M:
                case = f"fp8 {name} M={M}"
                fp8_gemm.fp8_linear_grouped(_meta(M, G, K), _meta(G * N, K, dtype=fp8),
                                            _meta(G * N // 128, -(-K // 128), dtype=f32), backend="triton")
        E, k, dim, inter = bq.EXPERTS, bq.TOP_K, bq.DIM, bq.INTER
        for T in bq.MOE_T:
            default = moe.default_moe_fp4_config(T * k, E, torch.bfloat16, inter=inter, num_sms=NUM_SMS)
            configs = [default] + ([c for c in bq.MOE_CANDIDATES if c != default] if variants else [])
            for i, config in enumerate(configs):
                case = f"fp4 experts T={T}" + ("" if i == 0 else f" cand{i}")
                moe.moe_fp4(_meta(T, dim), _meta(T, k, dtype=f32), _meta(T, k, dtype=torch.int64),
                            _meta(E, 2 * inter, dim // 2, dtype=u8), _meta(E, 2 * inter, dim // 32, dtype=u8),
                            _meta(E, dim, inter // 2, dtype=u8), _meta(E, dim, inter // 32, dtype=u8), 10.0,
                            backend="triton", config=config)
    return launches


def _constexprs(launch: Launch) -> dict:
    return {k: v for k, v in launch.kwargs.items() if k not in ("num_warps", "num_stages")}


def _compile(launch: Launch):
    """Triton's compile of this launch for sm_90 (the launcher's specialisation of the arguments)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    kwargs = dict(launch.kwargs, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    target = GPUTarget("cuda", 90, 32)
    backend = CUDABackend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def _tool(name: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def resources(compiled) -> dict:
    """Registers, stack and local (spill) bytes of the cubin, and SASS counts."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True).stdout
    fig = {key: int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK", "LOCAL")}
    ptx = compiled.asm["ptx"]
    spill = re.findall(r"(\d+) bytes spill stores", compiled.asm.get("ptxas_log", "")) if "ptxas_log" in \
        compiled.asm else []
    ops = [line.split("*/")[-1].strip() for line in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/", line)]
    count = lambda pattern: sum(1 for op in ops if re.search(pattern, op))  # noqa: E731
    return dict(regs=fig["REG"], stack=fig["STACK"], local=fig["LOCAL"], spill=spill,
                shared=int(compiled.metadata.shared), sass=len(ops), hgmma=count(r"\bHGMMA"),
                ldgsts=count(r"\bLDGSTS"), utmaldg=count(r"\bUTMALDG"), ldg=count(r"\bLDG\.|\bLDG "),
                atom=count(r"\bATOMG|\bRED\."), bar=count(r"\bBAR\.SYNC|\bBAR\.ARV"),
                wgmma_ptx="wgmma" in ptx)


def blocks_per_sm(regs: int, shared: int, num_warps: int) -> int:
    """Resident blocks an sm_90 SM holds: registers (allocated per warp in units of 256), shared memory, warps."""
    regs_warp = -(-regs * 32 // 256) * 256
    by_regs = SM_REGS // (regs_warp * num_warps)
    by_shared = SM_SHARED // (shared + BLOCK_SHARED_RESERVED) if shared else SM_BLOCKS
    return max(0, min(by_regs, by_shared, SM_WARPS // num_warps, SM_BLOCKS))


def weight_bytes_per_program(launch: Launch) -> int:
    """FP8 GEMM: BLOCK_N weight rows × its K range; FP4: BLOCK_N packed rows (two tiles for gate/up) × K/2."""
    kw = launch.kwargs
    name = launch.kernel.__name__
    if name == "_fp8_gemm_kernel":
        return kw["BLOCK_N"] * launch.args[15] * 128  # blocks_per_split
    if name == "_gate_up_kernel":
        return 2 * kw["BLOCK_N"] * launch.args[7] // 2  # dim
    if name == "_down_kernel":
        return kw["BLOCK_N"] * launch.args[7] // 2  # inter
    return 0


def report(launches: list[Launch]) -> str:
    lines = ["| case | kernel | constexprs | warps/stages | grid | programs/SM | regs | local/stack B | shared KiB | "
             "blocks/SM | waves | weight KiB/program | SASS | HGMMA | LDGSTS | LDG | ATOM |",
             "|" + "---|" * 17]
    cache: dict[str, dict] = {}
    for launch in launches:
        try:
            compiled = _compile(launch)  # Triton's cache holds each specialisation once
            key = compiled.hash
            if key not in cache:
                cache[key] = resources(compiled)
            r = cache[key]
        except Exception as e:  # shown in the table
            r = dict(error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}")
        programs = 1
        for g in launch.grid:
            programs *= g
        cx = " ".join(f"{k}={v}" for k, v in _constexprs(launch).items() if k not in ("FNUZ", "ENCODE"))
        ws = f"{launch.kwargs.get('num_warps', 4)}/{launch.kwargs.get('num_stages', 3)}"
        if "error" in r:
            lines.append(f"| {launch.case} | {launch.kernel.__name__} | {cx} | {ws} | {launch.grid} | | "
                         f"ERROR {r['error']} |" + " |" * 10)
            continue
        bps = blocks_per_sm(r["regs"], r["shared"], launch.kwargs.get("num_warps", 4))
        waves = programs / max(1, bps * NUM_SMS)
        lines.append(
            f"| {launch.case} | {launch.kernel.__name__} | {cx} | {ws} | {'×'.join(map(str, launch.grid))} | "
            f"{programs / NUM_SMS:.2f} | {r['regs']} | {max(r['local'], r['stack'])} | {r['shared'] / 1024:.1f} | "
            f"{bps} | "
            f"{waves:.2f} | {weight_bytes_per_program(launch) / 1024:.0f} | {r['sass']} | {r['hgmma']} | "
            f"{r['ldgsts']} | {r['ldg']} | {r['atom']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", action="store_true", help="also the decode candidates of --sweep")
    parser.add_argument("--out", help="write the markdown table here too")
    parser.add_argument("--only", help="only the cases whose name contains this text (e.g. 'fp4', 'M=64')")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") != "0":
        raise SystemExit("run with TRITON_INTERPRET unset: the kernels must be JITFunctions to compile")
    text = report([launch for launch in trace(args.variants) if args.only is None or args.only in launch.case])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
