"""The quantized-weight kernels compile for Hopper (sm_90) without a GPU: Triton's NVIDIA backend and its ptxas.

The first GPU run of kernels/fp8_gemm.py failed where Triton has no type for a dtype on NVIDIA (e4m3fnuz weights:
"type fp8e4b8 not supported in this architecture"); errors of that kind (types, inline PTX operands, shared memory
past the 227 KiB an H100/H200 block may use) show at compile time. A child process (the interpreter off) traces
the wrappers on meta tensors, records each launch, and compiles it for sm_90; the test checks every launch
compiled, within the shared-memory limit, and that the MMA paths are the intended ones (wgmma for FP8 prefill).
"""

import dataclasses
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from sm90_compile import (  # noqa: E402
    compile_in_child,
    error_text,
    meta,
    needs_nvidia_backend,
    record_launches,
    specialise,
)

SHARED_LIMIT = 227 * 1024


def _trace_and_compile() -> list[dict]:
    """Child process: the launches of the FP8 GEMM and the FP4 experts at decode and prefill, compiled."""
    import contextlib
    from unittest import mock

    import torch

    from sparsepd.kernels import device, fp8_gemm, moe
    from sparsepd.kernels.moe import MoEConfig

    launches = []
    f32, u8 = torch.float32, torch.uint8
    with contextlib.ExitStack() as stack:
        def patch(obj, name, value):
            stack.enter_context(mock.patch.object(obj, name, value))
        patch(device, "triton_interpreting", lambda: True)  # backend="triton" accepts meta tensors
        patch(fp8_gemm, "_num_sms", lambda dev: 132)
        patch(fp8_gemm, "_fp8_dot_supported", lambda dev: True)
        patch(fp8_gemm, "_pdl_supported", lambda dev: True)
        patch(moe, "_num_sms", lambda dev: 132)
        real_format = moe._weight_format  # "ptx" checks for a CUDA device: meta tensors stand in for one
        patch(moe, "_weight_format", lambda fp4, x, c: 3 if fp4 and c.fp4_unpack == "ptx" else real_format(fp4, x, c))
        for module in (fp8_gemm, moe):
            record_launches(stack, module, launches)
        for M in (1, 64, 256, 4096):
            for fp8 in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
                fp8_gemm.fp8_linear(meta(M, 4096), meta(1024, 4096, dtype=fp8), meta(8, 32, dtype=f32),
                                    backend="triton")
        fp8_gemm.fp8_linear_grouped(meta(1, 8, 4096), meta(8192, 4096, dtype=torch.float8_e4m3fn),
                                    meta(64, 32, dtype=f32), backend="triton")
        for M in (1, 64):  # programmatic dependent launch on the decode tiles (bench_quant.py's variant)
            config = fp8_gemm.default_fp8_config(M, 1024, 4096, 132)
            fp8_gemm.fp8_linear(meta(M, 4096), meta(1024, 4096, dtype=torch.float8_e4m3fn), meta(8, 32, dtype=f32),
                                backend="triton", config=dataclasses.replace(config, pdl=True))
        for T in (1, 8192):
            for unpack in ("dot_scaled", "ptx", "bits"):
                config = moe.default_moe_fp4_config(T * 6, 256, torch.bfloat16, inter=2048, num_sms=132)
                moe.moe_fp4(meta(T, 4096), meta(T, 6, dtype=f32), meta(T, 6, dtype=torch.int64),
                            meta(256, 4096, 2048, dtype=u8), meta(256, 4096, 128, dtype=u8),
                            meta(256, 4096, 1024, dtype=u8), meta(256, 4096, 64, dtype=u8), 10.0,
                            backend="triton", config=MoEConfig(config.block_m, config.block_n, config.block_k,
                                                               config.num_warps, config.num_stages, unpack))

    rows, seen = [], set()
    for kernel, args, kwargs in launches:
        launch = specialise(kernel, args, kwargs)
        config = launch.constexpr_text() + f" w{launch.options.num_warps} s{launch.options.num_stages}"
        if (kernel.__name__, config) in seen:
            continue
        seen.add((kernel.__name__, config))
        row = dict(kernel=kernel.__name__, config=config)
        try:
            compiled = launch.compile()
            ptx = compiled.asm["ptx"]
            row.update(shared=int(compiled.metadata.shared), wgmma="wgmma" in ptx, error=None,
                       gdc="griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx)
        except Exception as e:  # reported by the test with the launch that failed
            row.update(error=error_text(e))
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return compile_in_child(__file__, "--child")


pytestmark = needs_nvidia_backend


def test_every_launch_compiles_for_sm90(rows):
    bad = [f"{r['kernel']} [{r['config']}]: {r['error'] or 'shared ' + str(r['shared'])}" for r in rows
           if r["error"] or r["shared"] > SHARED_LIMIT]
    assert not bad, f"{len(bad)} of {len(rows)} launches do not compile for sm_90:\n" + "\n".join(bad)
    kernels = {r["kernel"] for r in rows}
    assert {"_fp8_gemm_kernel", "_act_quant_kernel", "_gate_up_kernel", "_down_kernel"} <= kernels
    assert any("OPERANDS=2" in r["config"] for r in rows), "the fnuz-on-NVIDIA path was not compiled"
    assert any("W_FMT=3" in r["config"] for r in rows), "the PTX unpacking was not compiled"


def test_fp8_pdl_launches_wait_on_the_grid_dependency(rows):
    """PDL=True launches carry griddepcontrol (launch_dependents, wait) in their PTX; the others none."""
    gemm = [r for r in rows if r["kernel"] == "_fp8_gemm_kernel"]
    pdl = [r for r in gemm if "PDL=True" in r["config"]]
    assert pdl and all(r.get("gdc") for r in pdl), [r["config"] for r in pdl]
    assert not any(r.get("gdc") for r in gemm if "PDL=False" in r["config"])


def test_fp8_prefill_and_decode_use_wgmma(rows):
    """Hopper's FP8 tensor cores: every FP8-operand GEMM launch (OPERANDS=0) issues wgmma."""
    fp8 = [r for r in rows if r["kernel"] == "_fp8_gemm_kernel" and "OPERANDS=0" in r["config"]]
    assert fp8 and all(r["wgmma"] for r in fp8), [r["config"] for r in fp8 if not r["wgmma"]]


if __name__ == "__main__" and sys.argv[1:] == ["--child"]:
    print(json.dumps(_trace_and_compile()))
