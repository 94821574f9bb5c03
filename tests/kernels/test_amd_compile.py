"""AMD build check, on the CPU: every Triton kernel of kernels/ compiled for MI355X (gfx950) and MI300X (gfx942).

For each target, the real wrappers are called on meta tensors (shapes and strides, no storage) at the project's
shapes (the `bench`, `v4-flash` and `v4-pro` presets of sparsepd/model_config.py; decode T = 1 … 256, prefill T = 8192),
with the device queries answered for the target (CU count, FP8 flavour, FP8 dots, dot precision) and every
kernel launch recorded instead of run. Each distinct launch is specialised as Triton's launcher would do it on
that device (triton.runtime.jit's binder with the HIP backend: 16-byte divisibility of pointers and ints, ints
equal to 1 as constants, a 32-bit pointer range for tensors under 2 GiB) and compiled by `triton.compile` for
the target. Its AMDGCN metadata must show no VGPR spills, no scratch and no SGPR spills (but in the kernels of
SGPR_SPILLS_ALLOWED, for the reason given there), and its LDS (Triton's `shared` bytes, allocated at launch, plus
any static LDS) must fit the target: 160 KiB on gfx950, 64 KiB on gfx942. The per-target launch tables see the
target's arch (kernels/device.py's amd_arch) and CU count, as on a ROCm device.

The default run compiles the largest tiles of each code path (flags, warps, stages, buffer addressing: ~130
launches); the soak test compiles every distinct launch (~290). Each compiles once per run, on every core; times
are in bench/RESULTS.md "AMD build check", and bench/amd_compile_report.py prints the figures as markdown.
Tracing and compiling run in a child process: this suite's conftest turns the Triton interpreter on before the
kernels are imported, and compiling needs real JITFunctions. Skipped when the installed Triton has no HIP backend.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
KERNEL_MODULES = ("argmax", "attn_merge", "compressor", "entry_rows", "ep_rows", "fp8_gemm", "hyper", "indexer",
                  "kv_rows", "moe", "rms_norm", "rope_norm", "routing", "sampling", "sparse_attention", "state_update",
                  "swiglu", "topk")  # every kernels/*.py with @triton.jit code
PRESETS = ("bench", "v4-flash", "v4-pro")
DECODE_T = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PREFILL_T = 8192
# A layer's KV pool and the caches: Triton addresses a tensor under 2 GiB with 32-bit buffer offsets, a larger one
# with 64-bit pointers (more VGPRs); deployments have both.
POOL_BYTES = (1 << 30, 4 << 30)
NUM_SLOTS = 256  # request slots of the state rings


@dataclass(frozen=True, slots=True)
class AmdTarget:
    arch: str
    gpu: str
    num_cus: int
    lds_bytes: int
    fp8: torch.dtype  # the FP8 e4m3 flavour of kernels/device.py's fp8_e4m3_dtype


TARGETS = (AmdTarget("gfx950", "MI355X", 256, 160 * 1024, torch.float8_e4m3fn),
           AmdTarget("gfx942", "MI300X", 304, 64 * 1024, torch.float8_e4m3fnuz))
METADATA_KEYS = ("vgpr_count", "agpr_count", "sgpr_count", "vgpr_spill_count", "sgpr_spill_count",
                 "private_segment_fixed_size", "group_segment_fixed_size")


def has_hip_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "amd" in backends


# ----------------------------------------------------------------------------------------------------
# Tracing: the wrappers on meta tensors, launches recorded


@dataclass(slots=True)
class Launch:
    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict
    where: str  # "preset decode" / "preset prefill"


class _Recorder:
    """Stands in for a JITFunction in its module while tracing: `kernel[grid](...)` records the call."""

    def __init__(self, kernel, sink: Callable[[object, tuple, dict], None]):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink(self.kernel, args, kwargs)


@contextlib.contextmanager
def _amd_device(target: AmdTarget, sink) -> Iterator[None]:
    """Kernel modules as they behave on `target`, launches going to `sink` (kernels must be JITFunctions)."""
    from triton.runtime.jit import JITFunction

    from sparsepd.kernels import compressor, device, fp8_gemm, hyper, indexer, topk
    modules = [importlib.import_module(f"sparsepd.kernels.{name}") for name in KERNEL_MODULES]
    with contextlib.ExitStack() as stack:
        def patch(obj, name, value):
            stack.enter_context(mock.patch.object(obj, name, value))
        patch(device, "triton_interpreting", lambda: True)  # backend="triton" accepts meta tensors
        for module in (indexer, compressor):
            patch(module, "fp8_e4m3_dtype", lambda device=None: target.fp8)
        patch(indexer, "_num_sms", lambda device: target.num_cus)
        patch(fp8_gemm, "_num_sms", lambda device: target.num_cus)
        patch(fp8_gemm, "_fp8_dot_supported", lambda device: True)  # the FP8 MFMA of both targets
        patch(indexer, "_fp8_dot_supported", lambda device: True)  # gfx942 (fnuz) and gfx950 (OCP) have FP8 MFMA
        table = topk.default_topk_config
        patch(topk, "default_topk_config", lambda n_programs, num_sms: table(n_programs, target.num_cus))
        patch(hyper, "_dot_precision", lambda device: "bf16x6")  # what it picks on any GPU
        patch(torch.version, "hip", "7.0")  # code that branches on ROCm takes its ROCm path
        for module in modules:
            if hasattr(module, "amd_arch"):
                patch(module, "amd_arch", lambda device: target.arch)  # the per-target launch tables
            for name, value in list(vars(module).items()):
                if isinstance(value, JITFunction) and value.__module__ == module.__name__:
                    patch(module, name, _Recorder(value, sink))
        yield


def _meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _pool(pool_bytes: int, row_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    row_bytes = torch.Size(row_shape).numel() * dtype.itemsize
    return _meta(pool_bytes // row_bytes, *row_shape, dtype=dtype)


def _token_counts() -> Iterator[tuple[str, int, int]]:
    """(phase, tokens, requests): decode batches of one token a request, one prefill chunk of one request."""
    for T in DECODE_T:
        yield "decode", T, T
    yield "prefill", PREFILL_T, 1


def _row_formats(cfg) -> list[tuple[tuple[int, ...], torch.dtype, object]]:
    """(row shape, dtype, KVRowLayout or None) of the main KV cache: FP8 KV rows (quantize_kv) and float rows."""
    from sparsepd.kernels.kv_rows import KVRowLayout
    layout = KVRowLayout(cfg.head_dim, cfg.rope_dim, getattr(torch, cfg.dtype))
    return [((layout.row_bytes,), torch.uint8, layout), ((cfg.head_dim,), getattr(torch, cfg.dtype), None)]


def _trace_attention(target: AmdTarget, cfg, T: int, B: int, pool_bytes: int) -> None:
    from sparsepd.kernels.sparse_attention import default_config, merge_attn, sparse_attn
    H, D = cfg.n_heads, cfg.head_dim
    f32 = torch.float32
    q, sink = _meta(T, H, D), _meta(H, dtype=f32)
    ratios = set(cfg.compress_ratios) - {0}
    keys = {cfg.window, cfg.window + cfg.index_topk} | {cfg.window + cfg.max_entries(r) for r in ratios - {4}}
    for K in sorted(keys):  # SWA-only, CSA (window + top-k) and HCA (window + every entry) layers
        for row_shape, dtype, layout in _row_formats(cfg):
            config = default_config(T, H, K, D, target.num_cus, target.arch, fp8_rows=layout is not None)
            sparse_attn(q, _pool(pool_bytes, row_shape, dtype), _meta(T, K, dtype=torch.int32), sink, D**-0.5,
                        kv_layout=layout, backend="triton", config=config)
    merge_attn(q, _meta(T, H, dtype=f32), q, _meta(T, H, dtype=f32), sink, backend="triton")


def _trace_indexer(target: AmdTarget, cfg, T: int, B: int, pool_bytes: int) -> None:
    from sparsepd.kernels.entry_rows import entry_rows
    from sparsepd.kernels.indexer import ROW_BYTES, indexer_cache_write, indexer_topk, quantize_rows_fp8
    from sparsepd.kernels.topk import topk_visible
    f32, i32 = torch.float32, torch.int32
    Hi, rows_per_page, E = cfg.index_n_heads, cfg.page_size // 4, cfg.max_entries(4)
    cache = _pool(pool_bytes, (rows_per_page, ROW_BYTES), torch.uint8)
    indexer_cache_write(cache, _meta(T, 128, dtype=f32), _meta(T, dtype=torch.int64), backend="triton")
    q8, q_scale = quantize_rows_fp8(_meta(T, Hi, 128, dtype=f32), backend="triton")
    page_table = _meta(B, E // rows_per_page, dtype=i32)
    visible = _meta(T, dtype=i32)
    indexer_topk(q8, q_scale, _meta(T, Hi, dtype=f32), cache, page_table, _meta(T, dtype=i32), visible,
                 cfg.index_topk, order="position", backend="triton")  # the engine's order
    entry_rows(_meta(T, cfg.index_topk, dtype=torch.int64), page_table, _meta(T, dtype=i32), rows_per_page, 0,
               backend="triton")  # the selected entries' rows in the paged cache
    topk_visible(_meta(T, E, dtype=f32), visible, cfg.index_topk, backend="triton")  # order="score"


def _trace_compressor(target: AmdTarget, cfg, T: int, B: int, pool_bytes: int) -> None:
    from sparsepd.kernels.compress_plan import CompressPlan, RowPlan
    from sparsepd.kernels.compressor import compress_indexer, compress_main
    from sparsepd.kernels.indexer import ROW_BYTES
    from sparsepd.kernels.kv_rows import pack_kv_rows
    from sparsepd.kernels.state_update import compressor_state_write, swa_ring_write
    f32, i32, act = torch.float32, torch.int32, getattr(torch, cfg.dtype)

    def rows(n: int) -> RowPlan:
        return RowPlan(_meta(n, 4, dtype=i32), _meta(B + 1, dtype=i32), torch.zeros(B + 1, dtype=i32), n)

    slots, cos = _meta(B, dtype=i32), _meta(cfg.max_seq_len, cfg.rope_dim // 2, dtype=f32)
    for ratio in sorted(set(cfg.compress_ratios) - {0}):
        overlap = ratio == 4
        coff = 2 if overlap else 1
        commits = B if T == B else T // ratio  # decode: at most one entry a request
        plan = CompressPlan(ratio, overlap, coff * ratio, rows(commits), rows(min(T, B * coff * ratio)))
        kinds = [(cfg.head_dim, False)] + ([(cfg.index_head_dim, True)] if overlap else [])
        for d, is_indexer in kinds:
            rows_per_page = cfg.page_size // ratio
            page_table = _meta(B, cfg.max_seq_len // cfg.page_size, dtype=i32)
            kv, ape = _meta(T, coff * d, dtype=f32), _meta(ratio, coff * d, dtype=f32)
            ring = _meta(NUM_SLOTS, coff * ratio, coff * d, dtype=f32)
            args = (kv, kv, ape, ring, ring, slots, plan, _meta(d, dtype=act), cos, cos)
            if is_indexer:
                cache = _pool(pool_bytes, (rows_per_page, ROW_BYTES), torch.uint8)
                compress_indexer(*args, cache, page_table, eps=1e-6, act_dtype=act, backend="triton")
            else:
                for row_shape, dtype, layout in _row_formats(cfg):
                    cache = _pool(pool_bytes, (rows_per_page, *row_shape), dtype)
                    compress_main(*args, cache, page_table, eps=1e-6, act_dtype=act, row_layout=layout,
                                  backend="triton")
            compressor_state_write(kv, kv, ape, ring, ring, slots, plan, backend="triton")
    for row_shape, dtype, layout in _row_formats(cfg):
        scratch = _meta(T, *row_shape, dtype=dtype)
        if layout is not None:
            pack_kv_rows(_meta(T, cfg.head_dim, dtype=act), layout, scratch, backend="triton")  # the new latents
        swa = _meta(NUM_SLOTS, cfg.window, *row_shape, dtype=dtype)
        swa_ring_write(scratch, swa, slots, rows(min(T, B * cfg.window)), backend="triton")


def _trace_layers(target: AmdTarget, cfg, T: int, B: int) -> None:
    from sparsepd.kernels.argmax import argmax_rows
    from sparsepd.kernels.hyper import hc_head_fused, hc_post_fused, hc_pre_fused
    from sparsepd.kernels.moe import moe
    from sparsepd.kernels.rms_norm import rms_norm
    from sparsepd.kernels.rope_norm import rms_rope
    from sparsepd.kernels.routing import route
    from sparsepd.kernels.sampling import exponentials
    from sparsepd.kernels.swiglu import silu_mul
    f32, act = torch.float32, getattr(torch, cfg.dtype)
    for width in (cfg.dim, cfg.q_lora_rank, cfg.head_dim):  # the block norms, the query latent's, the compressors'
        rms_norm(_meta(T, width, dtype=act), _meta(width, dtype=act), cfg.norm_eps, backend="triton")
    dim, hc, H, D = cfg.dim, cfg.hc_mult, cfg.n_heads, cfg.head_dim
    E, k, inter = cfg.n_routed_experts, cfg.n_activated_experts, cfg.moe_inter_dim
    logits = _meta(T, E, dtype=f32)  # the gate's linear
    route(logits, _meta(E, dtype=f32), k, cfg.route_scale, backend="triton")  # a top-k layer
    route(logits, None, k, cfg.route_scale, _meta(T, k, dtype=torch.int64), backend="triton")  # a hash layer
    moe(_meta(T, dim, dtype=act), _meta(T, k, dtype=f32), _meta(T, k, dtype=torch.int64),
        _meta(E, 2 * inter, dim, dtype=act), _meta(E, dim, inter, dtype=act), cfg.swiglu_limit, backend="triton")
    shared = _meta(T, inter * cfg.n_shared_experts, dtype=act)  # the shared expert's gate and up
    silu_mul(shared, shared, cfg.swiglu_limit, backend="triton")
    x, mix = _meta(T, hc, dim, dtype=act), (2 + hc) * hc
    hc_pre_fused(x, _meta(mix, hc * dim, dtype=f32), _meta(3, dtype=f32), _meta(mix, dtype=f32),
                 cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.norm_eps, backend="triton")
    hc_post_fused(_meta(T, dim, dtype=act), x, _meta(T, hc, dtype=f32), _meta(T, hc, hc, dtype=f32),
                  backend="triton")
    hc_head_fused(x, _meta(hc, hc * dim, dtype=f32), _meta(1, dtype=f32), _meta(hc, dtype=f32), cfg.hc_eps,
                  cfg.norm_eps, backend="triton")
    cos = _meta(T, cfg.rope_dim // 2, dtype=f32)
    q = _meta(T, H, D, dtype=act)
    rms_rope(_meta(T, D, dtype=act), cos, cos, weight=_meta(D, dtype=act), eps=cfg.norm_eps, fp8_block=64,
             backend="triton")  # the KV latent
    rms_rope(q, cos, cos, weight=None, eps=cfg.norm_eps, backend="triton")  # queries
    rms_rope(q, cos, cos, weight=None, eps=None, inverse=True, backend="triton")  # the output's inverse RoPE
    if T == B:
        seeds = _meta(B, dtype=torch.int64)
        exponentials(seeds, seeds, cfg.vocab_size, backend="triton")
        argmax_rows(_meta(B, cfg.vocab_size, dtype=f32), backend="triton")  # the greedy draw


def _trace_quantized(target: AmdTarget, cfg, T: int, B: int) -> None:
    """The checkpoint's FP8 projections (weights in the target's FP8 flavour) and its FP4 routed experts."""
    from sparsepd.kernels.fp8_gemm import fp8_linear
    from sparsepd.kernels.moe import moe_fp4
    f32, u8, act = torch.float32, torch.uint8, getattr(torch, cfg.dtype)
    dim, hd, inter = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.moe_inter_dim
    projections = {(cfg.q_lora_rank, dim), (hd, cfg.q_lora_rank), (cfg.head_dim, dim),
                   (cfg.o_lora_rank, hd // cfg.o_groups), (dim, cfg.o_groups * cfg.o_lora_rank),
                   (2 * inter, dim), (dim, inter)}  # wq_a, wq_b, wkv, a group of wo_a, wo_b, shared w13, w2
    for N, K in sorted(projections):
        fp8_linear(_meta(T, K, dtype=act), _meta(N, K, dtype=target.fp8),
                   _meta(-(-N // 128), -(-K // 128), dtype=f32), backend="triton")
    E, k = cfg.n_routed_experts, cfg.n_activated_experts
    moe_fp4(_meta(T, dim, dtype=act), _meta(T, k, dtype=f32), _meta(T, k, dtype=torch.int64),
            _meta(E, 2 * inter, dim // 2, dtype=u8), _meta(E, 2 * inter, dim // 32, dtype=u8),
            _meta(E, dim, inter // 2, dtype=u8), _meta(E, dim, inter // 32, dtype=u8), cfg.swiglu_limit,
            backend="triton")


EP_WORLD = 8  # ranks of an expert-parallel group: a node


def _trace_expert_exchange(target: AmdTarget, cfg, T: int, B: int) -> None:
    """An expert-parallel MoE layer's row packing and combine (kernels/ep_rows.py) for a group of a node."""
    from sparsepd.kernels.ep_rows import combine_ep_rows, pack_ep_rows
    E, k = cfg.n_routed_experts, cfg.n_activated_experts
    pack_ep_rows(_meta(T, cfg.dim, dtype=getattr(torch, cfg.dtype)), _meta(T, k, dtype=torch.float32),
                 _meta(T, k, dtype=torch.int64), EP_WORLD, E // EP_WORLD, backend="triton")
    combine_ep_rows(_meta(EP_WORLD * T, cfg.dim, dtype=torch.float32), _meta(EP_WORLD, T, dtype=torch.int32),
                    backend="triton")


def trace_launches(target: AmdTarget) -> list[Launch]:
    """Every kernel launch the wrappers make on `target` at the project's shapes, in call order."""
    from sparsepd.model_config import PRESETS as MODEL_PRESETS
    launches: list[Launch] = []
    where = ""
    with _amd_device(target, lambda kernel, args, kwargs: launches.append(Launch(kernel, args, kwargs, where))):
        for name in PRESETS:
            cfg = MODEL_PRESETS[name]
            for phase, T, B in _token_counts():
                where = f"{name} {phase}"
                for pool_bytes in POOL_BYTES:
                    for trace in (_trace_attention, _trace_indexer, _trace_compressor):
                        trace(target, cfg, T, B, pool_bytes)
                _trace_layers(target, cfg, T, B)
                _trace_quantized(target, cfg, T, B)
                _trace_expert_exchange(target, cfg, T, B)
    return launches


# ----------------------------------------------------------------------------------------------------
# Compiling: one job per distinct specialisation


@dataclass(slots=True)
class CompileJob:
    kernel: object  # the JITFunction
    arch: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict  # HIPOptions fields
    where: set[str]

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def declared(self) -> list[tuple[str, object]]:
        """The kernel's tl.constexpr parameters with their values (not runtime ints specialised to 1)."""
        params = self.kernel.params
        return [(params[path[0]].name, v) for path, v in sorted(self.constexprs.items())
                if params[path[0]].is_constexpr]

    def config(self) -> str:
        """Constexprs as NAME=value (tiles, flags, dtypes), then warps and stages."""
        parts = [f"{name}={_short(v)}" for name, v in self.declared()]
        return " ".join(parts + [f"w{self.options['num_warps']}", f"st{self.options['num_stages']}"])

    def code_path(self) -> tuple:
        """What selects the kernel's code rather than sizing its tiles: flags, modes and dtypes, ints 0 and 1
        (TOKENS=1, FP8_BLOCK=0, COFF=1, ...), warps and stages, and which pointers get 32-bit buffer addressing."""
        flags = [(name, _short(v)) for name, v in self.declared()
                 if not isinstance(v, int) or isinstance(v, bool) or v in (0, 1)]
        buffers = tuple(sorted(path for path, attr in self.attrs.items() if ["tt.pointer_range", 32] in attr))
        return (self.arch, self.kernel.__module__, self.name, tuple(flags), self.options["num_warps"],
                self.options["num_stages"], buffers)

    def tile_size(self) -> int:
        return math.prod(v for _, v in self.declared() if isinstance(v, int) and not isinstance(v, bool) and v > 1)


def _short(value) -> str:
    return str(value).removeprefix("triton.language.").removeprefix("tl.")


def specialise(launch: Launch, target: AmdTarget) -> CompileJob:
    """The signature, constants, attributes and options Triton's launcher derives from these arguments on the
    target (JITFunction.run → create_binder → _pack_args, with the HIP backend in place of the active driver)."""
    from triton import knobs
    from triton.backends.amd.compiler import HIPBackend
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import create_function_from_signature
    kernel, kwargs = launch.kernel, dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    backend = HIPBackend(GPUTarget("hip", target.arch, 64))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return CompileJob(kernel, target.arch, signature, constexprs, attrs, dict(options.__dict__), {launch.where})


def _job_key(job: CompileJob) -> str:
    return repr((job.kernel.__module__, job.name, job.arch, sorted(job.signature.items()),
                 sorted((k, _short(v)) for k, v in job.constexprs.items()), sorted(job.attrs.items()),
                 sorted((k, repr(v)) for k, v in job.options.items())))


def collect_jobs(exhaustive: bool, targets=TARGETS) -> list[CompileJob]:
    """Distinct compile jobs over the targets, each with the preset/phase launches that need it: all of them, or
    (exhaustive=False) the largest tiles of each code path."""
    jobs: dict[str, CompileJob] = {}
    for target in targets:
        for launch in trace_launches(target):
            job = specialise(launch, target)
            key = _job_key(job)
            if key in jobs:
                jobs[key].where |= job.where
            else:
                jobs[key] = job
    if exhaustive:
        return list(jobs.values())
    largest: dict[tuple, CompileJob] = {}
    for job in (jobs[key] for key in sorted(jobs)):
        best = largest.get(job.code_path())
        if best is None or job.tile_size() > best.tile_size():
            largest[job.code_path()] = job
    return list(largest.values())


_JOBS: list[CompileJob] = []  # read by forked compile workers


def _compile(index: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    job = _JOBS[index]
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(job.kernel, job.signature, job.constexprs, job.attrs),
                              target=GPUTarget("hip", job.arch, 64), options=job.options)
    asm = compiled.asm["amdgcn"]
    figures = {}
    for key in METADATA_KEYS:
        found = re.search(rf"^[\s-]*\.{key}:\s*(\d+)\s*$", asm, re.M)  # the kernel's YAML metadata
        figures[key] = int(found.group(1)) if found else None
    occupancy = re.search(r"; Occupancy: (\d+)", asm)
    return dict(figures, shared=int(compiled.metadata.shared), compile_s=round(time.perf_counter() - start, 2),
                occupancy=int(occupancy.group(1)) if occupancy else waves_from_vgprs(figures["vgpr_count"]))


def waves_from_vgprs(vgprs: int) -> int:
    """Waves a SIMD can hold given a wave's VGPRs (arch + AGPRs) on gfx90a/gfx942/gfx950: a unified file of
    512 registers a lane, allocated in granules of 8, at most 8 waves."""
    return min(8, 512 // max(8, -(-vgprs // 8) * 8))


def compile_jobs(jobs: list[CompileJob], workers: int) -> list[dict]:
    """Compile every job (in `workers` forked processes) and return its row: kernel, arch, config, figures."""
    global _JOBS
    _JOBS = jobs
    import multiprocessing
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        figures = list(pool.map(_compile, range(len(jobs))))
    lds_limit = {t.arch: t.lds_bytes for t in TARGETS}
    return [dict(kernel=job.name, module=job.kernel.__module__.rsplit(".", 1)[-1], arch=job.arch,
                 config=job.config(), num_warps=job.options["num_warps"], where=sorted(job.where),
                 lds_limit=lds_limit[job.arch], **fig)
            for job, fig in zip(jobs, figures, strict=True)]


# Kernels allowed SGPR spills, which the compiler keeps in VGPR lanes while there is no scratch (a few extra
# instructions, no memory traffic). Removing them takes a kernel change, not a launch config.
SGPR_SPILLS_ALLOWED = {
    "_select_kernel": "kernels/topk.py: 3-137 SGPRs spilled at the table's 4-16 warps (16 warps leave 3-13 on "
                      "16K-key final segments, and a workgroup has at most 16)",
}


def problems(row: dict) -> list[str]:
    """What is wrong with one compiled launch (empty when it fits)."""
    out = []
    for key in ("vgpr_spill_count", "sgpr_spill_count", "private_segment_fixed_size"):
        allowed = (key == "sgpr_spill_count" and row["kernel"] in SGPR_SPILLS_ALLOWED
                   and row["private_segment_fixed_size"] == 0)
        if row[key] is None:
            out.append(f"no .{key} in the AMDGCN metadata")
        elif row[key] and not allowed:
            out.append(f"{key}={row[key]}")
    lds = row["shared"] + (row["group_segment_fixed_size"] or 0)
    if lds > row["lds_limit"]:
        out.append(f"LDS {lds} B > {row['lds_limit']} B")
    return out


def main(argv: list[str]) -> int:
    """Child process: `OUT.json [--all]`: trace, compile, write the rows as JSON."""
    import warnings
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    rows = compile_jobs(collect_jobs(exhaustive="--all" in argv), len(os.sched_getaffinity(0)))
    Path(argv[0]).write_text(json.dumps(rows))
    return 0


def run_build_check(exhaustive: bool, timeout_s: float = 3600) -> list[dict]:
    """Run `main` in a child process with the interpreter off; its rows."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        env = dict(os.environ, TRITON_INTERPRET="0")
        cmd = [sys.executable, __file__, str(out)] + (["--all"] if exhaustive else [])
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"AMD build check failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


# ----------------------------------------------------------------------------------------------------
# Tests

pytestmark = pytest.mark.skipif(not has_hip_backend(), reason="the installed Triton has no HIP (AMD) backend")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return run_build_check(exhaustive=False)


def _misfits(rows: list[dict], arch: str) -> str:
    bad = [f"{r['module']}.{r['kernel']} [{r['config']}] ({', '.join(r['where'])}): {'; '.join(problems(r))}"
           for r in rows if r["arch"] == arch and problems(r)]
    return f"{len(bad)} launches do not fit {arch}:\n" + "\n".join(bad) if bad else ""


@pytest.mark.parametrize("arch", [t.arch for t in TARGETS])
def test_every_code_path_fits_the_target(rows, arch):
    """The largest tiles of each code path (the soak test below compiles every launch)."""
    assert not _misfits(rows, arch), _misfits(rows, arch)


@pytest.mark.soak
def test_every_launch_fits_the_target():
    rows = run_build_check(exhaustive=True)
    assert {r["arch"] for r in rows} == {t.arch for t in TARGETS}
    report = "".join(_misfits(rows, t.arch) for t in TARGETS)
    assert not report, report


def test_every_kernel_is_compiled(rows):
    """Each @triton.jit kernel launched by a wrapper in kernels/ appears for both targets."""
    launched = set()
    for path in (REPO / "kernels").glob("*.py"):
        launched |= set(re.findall(r"\b(_\w+)\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(", path.read_text()))  # kernel[grid](
    for target in TARGETS:
        compiled = {r["kernel"] for r in rows if r["arch"] == target.arch}
        assert launched <= compiled, f"never compiled for {target.arch}: {sorted(launched - compiled)}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
