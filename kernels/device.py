"""Where a kernel runs: Triton on GPU tensors, the PyTorch reference on CPU tensors.

Every public kernel wrapper takes `backend="auto" | "triton" | "reference"` and resolves it with
`pick_backend`. "auto" means Triton when every tensor is on a CUDA/ROCm device, the reference
otherwise; SPARSEPD_FORCE_REFERENCE=1 makes "auto" pick the reference everywhere (debugging).
"triton" on CPU tensors is allowed only under TRITON_INTERPRET=1 (the CPU tests set it before
Triton is imported), so the same kernels are tested on a machine without a GPU; there,
SPARSEPD_FORCE_TRITON=1 makes "auto" pick Triton for CPU tensors too, so a whole engine runs its
kernels in the interpreter (tests/engine/test_triton_engine.py).
"""

from __future__ import annotations

import os
from typing import Literal

import torch

Backend = Literal["auto", "triton", "reference"]


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pick_backend(backend: Backend, *tensors: torch.Tensor) -> Literal["triton", "reference"]:
    """Resolve `backend` for these tensors; raise when Triton cannot run them."""
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    on_gpu = all(t.is_cuda for t in tensors)
    if backend == "auto":
        if os.environ.get("SPARSEPD_FORCE_REFERENCE", "0") == "1":
            return "reference"
        interpreted = triton_interpreting() and os.environ.get("SPARSEPD_FORCE_TRITON", "0") == "1"
        return "triton" if on_gpu or interpreted else "reference"
    if backend == "triton" and not on_gpu and not triton_interpreting():
        raise ValueError("backend='triton' needs GPU tensors, or TRITON_INTERPRET=1 for CPU tensors")
    return backend


def amd_arch(device: torch.device | str) -> str | None:
    """The AMD GPU architecture of a ROCm device ("gfx942" on MI300X, "gfx950" on MI355X), else None: the key of the
    kernels' per-target launch configs (checked by compiling for both, tests/kernels/test_amd_compile.py)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.version.hip:
        return None
    return torch.cuda.get_device_properties(device).gcnArchName.split(":")[0]


def fp8_e4m3_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """The platform's FP8 e4m3 flavour: e4m3fn on H100 and MI355X (OCP), e4m3fnuz on MI300 (gfx94x)."""
    if device is not None and torch.device(device).type == "cuda" and torch.version.hip:
        if torch.cuda.get_device_properties(torch.device(device)).gcnArchName.startswith("gfx94"):
            return torch.float8_e4m3fnuz
    return torch.float8_e4m3fn
