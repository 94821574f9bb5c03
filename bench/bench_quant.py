"""Benchmark of the quantized-weight kernels on the GPU: kernels/fp8_gemm.py and kernels/moe.py's FP4 experts.

FP8 GEMM (`fp8_linear`, activation quantization included) at V4-Flash's projection shapes (model/attention.py and
the shared expert, dims from sparsepd/model_config.py's v4-flash preset: dim 4096, 64 heads × 512, q_lora 1024,
8 output groups × o_lora 1024, moe_inter 2048), bf16 activations:
- prefill, M ∈ {4096, 8192}: TFLOP/s against torch's bf16 matmul of the same shape (F.linear, bf16 weights) in the
  same run; target (issue 28) ≥ 70% of 2 × the bf16 rate;
- decode, M ∈ {1, 8, 32, 64} (and 256, a mid-size batch): time against the floor of the bytes it must move (FP8
  weights + scales, x, y) at the copy bandwidth measured here; target ≥ 70% of the floor (floor / time). Also the
  grouped output projection (wo_a's 8 groups in one `fp8_linear_grouped` launch; bf16 column: 8 matmuls), wq_a and
  wkv stacked into one launch (both read x), and per case one device copy moving the same bytes in the same graph
  rotation ("copy µs": what one streaming launch of that size costs here, its fixed latency included).
FP4 experts (`moe_fp4`) at decode, T ∈ {1, 8, 64, 256}, V4-Flash's experts (256 × [2·2048, 4096] and [4096, 2048],
top-6, random routing with distinct experts a token): time against the floor of the bytes it reads (the packed
weights and scales of every touched expert once, x, the fp32 per-slot outputs written); target ≥ 60%.

Two modes, one GPU run each:
- default (no flag): every case with the kernels' default launch configs only;
- --sweep: the same, then per swept case every candidate config of its shape class (the lists below), each checked
  against the reference (output NaN-poisoned first) before it is timed; prints the best config per case (as
  Python, to paste into the tables) and its gain over the default. FP8 decode (M = 1 … 256) also times the default
  with a persistent ticket buffer (`tickets=`: no memset launch), with programmatic dependent launch as well
  (`pdl=True`), the split count of the rule before 2026-12-06, and split counts 1 … 32 on the default tile
  (`fp8_variants`). Candidate kernels are compiled first by --jobs
  worker processes (Triton's disk cache), so a cold machine spends ~20-40 s compiling rather than minutes.
- --list: no GPU; prints the cases and every swept FP8 decode variant with the programs its grid holds.
Cases start only while --budget-s is left (the ceilings and defaults first); the ones skipped are listed.

Timing: decode calls are captured in a CUDA graph that makes one call per rotated input set (distinct weight copies
or routings, enough to move ≥ 2× the L2), the median replay (triton.testing.do_bench) divided by the number of
calls: how decode runs, weights from DRAM. Prefill uses do_bench's median (it clears the L2 before each call).
Ceilings measured in the same run: copy bandwidth (1 GiB device-to-device, read + write), bf16 matmul (8192³).

    python3 bench/bench_quant.py --out OUT.json [--sweep] [--only TEXT] [--budget-s 130] [--jobs 12]
    python3 bench/bench_quant.py --list [--sweep] [--num-sms 132]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton

from sparsepd.kernels.fp8_gemm import (
    PREVIOUS_SPLIT_RULE,
    Fp8GemmConfig,
    choose_split_k,
    config_class,
    default_fp8_config,
    fp8_linear,
    fp8_linear_grouped,
    fp8_linear_ref,
    max_tickets,
)
from sparsepd.kernels.moe import MoEConfig, build_dispatch, default_moe_fp4_config, moe_fp4, moe_fp4_ref

DIM, HEADS, HEAD_DIM, Q_LORA, O_GROUPS, O_LORA, INTER, EXPERTS, TOP_K = 4096, 64, 512, 1024, 8, 1024, 2048, 256, 6
PROJECTIONS = {  # name: (N, K)
    "wq_a": (Q_LORA, DIM), "wq_b": (HEADS * HEAD_DIM, Q_LORA), "wkv": (HEAD_DIM, DIM),
    "wo_a (a group)": (O_LORA, HEADS * HEAD_DIM // O_GROUPS), "wo_b": (DIM, O_GROUPS * O_LORA),
    "shared w1+w3": (2 * INTER, DIM), "shared w2": (DIM, INTER),
    "wq_a+wkv (one launch)": (Q_LORA + HEAD_DIM, DIM),  # both read x: one launch if the model stacked them
}
GROUPED = {"wo_a (8 groups, one launch)": (O_LORA, HEADS * HEAD_DIM // O_GROUPS, O_GROUPS)}  # name: (N, K, G)
PREFILL_M, DECODE_M, MOE_T = (4096, 8192), (1, 8, 32, 64, 256), (1, 8, 64, 256)
SWEPT_PREFILL_M, SWEPT_DECODE_M, SWEPT_MOE_T = (8192,), (1, 8, 32, 64, 256), (1, 8, 64)
SPLIT_COUNTS = (1, 2, 4, 8, 16, 32)  # split-K counts swept on the default tile at each swept decode M


def _c(*a, **k) -> Fp8GemmConfig:
    return Fp8GemmConfig(*a, **k)


# Candidates per shape class of kernels/fp8_gemm.py's table (config_class: M ≤ 16, ≤ 64, ≤ 512, larger). split_k=0
# means "choose_split_k for this tile" (the default's rule); a number fixes it.
FP8_CANDIDATES: dict[int, list[Fp8GemmConfig]] = {
    0: [_c(16, 64, 0, 4, 4, 1, quant_a=True, swap_ab=True), _c(16, 64, 0, 4, 6, 1, quant_a=True, swap_ab=True),
        _c(16, 64, 0, 4, 3, 1, quant_a=True, swap_ab=True), _c(16, 128, 0, 8, 4, 1, quant_a=True, swap_ab=True),
        _c(16, 32, 0, 4, 6, 1, quant_a=True), _c(16, 64, 0, 4, 4, 1, swap_ab=True),
        _c(16, 64, 1, 4, 4, 1, quant_a=True, swap_ab=True), _c(16, 64, 0, 4, 4, 1, quant_a=True)],
    1: [_c(64, 64, 0, 4, 4, 1), _c(64, 64, 0, 4, 3, 1), _c(64, 64, 0, 4, 5, 1), _c(32, 64, 0, 4, 4, 1, swap_ab=True),
        _c(64, 64, 0, 4, 4, 1, swap_ab=True), _c(64, 64, 0, 4, 4, 1, quant_a=True), _c(64, 128, 0, 4, 4, 1),
        _c(64, 32, 0, 4, 4, 1), _c(64, 64, 1, 4, 4, 1)],
    2: [_c(64, 128, 1, 4, 4, 8), _c(64, 128, 1, 4, 3, 8), _c(64, 64, 1, 4, 4, 8), _c(128, 128, 1, 8, 3, 8),
        _c(64, 64, 0, 4, 4, 8), _c(64, 64, 0, 4, 3, 8)],
    3: [_c(128, 128, 1, 8, 3, 8), _c(128, 128, 1, 8, 4, 8), _c(64, 128, 1, 4, 3, 8), _c(64, 128, 1, 4, 4, 8),
        _c(64, 128, 1, 4, 5, 8), _c(128, 64, 1, 4, 4, 8), _c(128, 128, 1, 8, 3, 8, max_regs=128),
        _c(64, 128, 1, 4, 4, 16), _c(128, 128, 1, 8, 4, 16)],
}
# FP4 decode candidates (kernels/moe.py's decode row and its neighbours: N tile, K step, warps, stages, unpacking)
MOE_CANDIDATES = [MoEConfig(16, bn, bk, w, st, unpack)
                  for bn, bk, w, st in ((64, 128, 2, 4), (32, 128, 2, 4), (64, 128, 2, 3), (32, 256, 2, 3),
                                        (32, 64, 2, 6), (64, 128, 4, 4), (32, 128, 1, 4), (64, 256, 4, 3))
                  for unpack in ("dot_scaled", "ptx")] + [MoEConfig(16, 64, 128, 2, 4, "bits")]
# More programs and more resident warps (2026-12-06, compiled for sm_90: the PTX decode tiles take 168 / 130
# registers at 2 warps, so an SM holds 6-7 programs, 12-14 warps; at T = 1 the 32-wide tiles give 384 gate/up
# programs, 2.9 an SM): 16-wide N tiles (twice the programs), a 128-register cap (8 programs an SM), 4 warps
MOE_CANDIDATES += [MoEConfig(16, 16, 128, 2, 4, "ptx"), MoEConfig(16, 16, 128, 2, 4, "dot_scaled"),
                   MoEConfig(16, 32, 128, 2, 4, "ptx", max_regs=128), MoEConfig(16, 16, 128, 2, 4, "ptx", max_regs=128),
                   MoEConfig(16, 32, 128, 4, 4, "ptx"), MoEConfig(16, 16, 256, 2, 3, "ptx")]


@dataclass(frozen=True, slots=True)
class Device:
    """What the floors are measured against, from this run."""

    copy_bytes_per_s: float
    bf16_flops: float
    l2_bytes: int
    num_sms: int


def bench_us(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3


def graph_us(calls: list[Callable[[], object]]) -> float:
    """Median replay of a CUDA graph holding `calls` (after a warm-up run of each), µs per call."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return bench_us(graph.replay) / len(calls)


def copy_bandwidth() -> float:
    src = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * (1 << 30) / (bench_us(lambda: dst.copy_(src)) * 1e-6)


def matmul_rate(n: int = 8192) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    return 2 * n**3 / (bench_us(lambda: torch.matmul(a, b, out=c)) * 1e-6)


def fp8_weight(N: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = (torch.randn(N, K, device="cuda") * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.exp2(torch.randint(-12, -6, (-(-N // 128), -(-K // 128)), device="cuda").float())
    return w, scale


def n_sets(set_bytes: int, l2_bytes: int, most: int = 64) -> int:
    return max(2, min(most, -(-2 * l2_bytes // set_bytes)))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def resolve(config: Fp8GemmConfig, M: int, N: int, K: int, num_sms: int) -> Fp8GemmConfig:
    """split_k 0 → the default's rule for this tile."""
    if config.split_k:
        return config
    return dataclasses.replace(config, split_k=choose_split_k(M, N, K, config.block_m, config.block_n, num_sms))


@dataclass(frozen=True, slots=True)
class Variant:
    """One timed launch: a config, and whether the call gets a persistent zeroed ticket buffer (`tickets=`: no
    memset launch a split-K call) instead of making its counters."""

    config: Fp8GemmConfig
    tickets: bool = False
    note: str = ""  # what the variant is, for the report

    def label(self) -> str:
        return repr(self.config) + (" +tickets" if self.tickets else "") + (f" [{self.note}]" if self.note else "")


def fp8_candidates(M: int, N: int, K: int, num_sms: int) -> list[Fp8GemmConfig]:
    """The default config, then the candidates of its shape class (split_k 0 resolved), each once."""
    return list(dict.fromkeys(v.config for v in fp8_variants(M, N, K, num_sms, decode=False)))


def fp8_variants(M: int, N: int, K: int, num_sms: int, decode: bool = True) -> list[Variant]:
    """The default first; at decode (M ≤ 256) the default with a ticket buffer, the split count of the rule before
    2026-12-06 (PREVIOUS_SPLIT_RULE), and every power-of-two split count on the default tile (each split ≥ 1 block
    of 128, with tickets); then the class candidates (with tickets where they split)."""
    default = default_fp8_config(M, N, K, num_sms)
    out = [Variant(default, note="default")]
    split_ok = decode and M <= 256
    if split_ok:
        if default.split_k > 1:
            out.append(Variant(default, True, "default"))
        # programmatic dependent launch: each call launched while the one before drains (with tickets: no memset
        # node between the calls, which would break the overlap)
        out.append(Variant(dataclasses.replace(default, pdl=True), default.split_k > 1, "default, PDL"))
        previous = choose_split_k(M, N, K, default.block_m, default.block_n, num_sms, **PREVIOUS_SPLIT_RULE)
        out.append(Variant(dataclasses.replace(default, split_k=previous), previous > 1, "previous split rule"))
        for split in SPLIT_COUNTS:
            if split <= -(-K // 128):
                out.append(Variant(dataclasses.replace(default, split_k=split), split > 1))
    for c in FP8_CANDIDATES[config_class(M)]:
        c = resolve(c, M, N, K, num_sms)
        out.append(Variant(c, split_ok and c.split_k > 1))
    seen, unique = set(), []
    for v in out:
        if (v.config, v.tickets) not in seen:
            seen.add((v.config, v.tickets))
            unique.append(v)
    return unique


# --- cases ------------------------------------------------------------------------------------------
def fp8_prefill(name: str, N: int, K: int, M: int, dev: Device, sweep: bool) -> dict:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w, scale = fp8_weight(N, K)
    w16 = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    flops = 2 * M * N * K
    ref = fp8_linear_ref(x[:256], w, scale)  # rows enough to catch a wrong config, cheap in fp32
    configs = fp8_candidates(M, N, K, dev.num_sms) if sweep else [default_fp8_config(M, N, K, dev.num_sms)]
    timings = {}
    for c in configs:
        err = rel_err(fp8_linear(x, w, scale, config=c)[:256], ref)
        timings[repr(c)] = (flops / bench_us(lambda c=c: fp8_linear(x, w, scale, config=c)) / 1e6
                            if err <= 1e-2 else f"WRONG (rel err {err:.3g})")
    bf16 = bench_us(lambda: F.linear(x, w16))
    default = repr(configs[0])
    tflops = timings[default] if isinstance(timings[default], float) else 0.0
    return dict(kind="fp8 prefill", name=name, M=M, N=N, K=K, us=flops / max(tflops, 1e-9) / 1e6, tflops=tflops,
                bf16_us=bf16, bf16_tflops=flops / bf16 / 1e6, of_2x_bf16=tflops / (2 * flops / bf16 / 1e6),
                config=default, **({"sweep": timings, "metric": "TFLOP/s"} if sweep else {}))


def fp8_decode(name: str, N: int, K: int, M: int, dev: Device, sweep: bool, groups: int = 1) -> dict:
    """groups > 1: `fp8_linear_grouped` of `groups` products [M, K] × [N, K]^T in one launch (N per group)."""
    weight_bytes = groups * (N * K + 4 * (-(-N // 128)) * (-(-K // 128)))
    floor_bytes = weight_bytes + groups * (2 * M * K + 2 * M * N)
    sets = [fp8_weight(groups * N, K) for _ in range(n_sets(weight_bytes, dev.l2_bytes))]
    x = torch.randn(M, groups, K, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    tickets = torch.zeros(max_tickets(M, N, groups), device="cuda", dtype=torch.int32)  # left zeroed by each call

    def run(w, s, c=None, with_tickets=False):
        t = tickets if with_tickets else None
        if groups > 1:
            return fp8_linear_grouped(x, w, s, config=c, tickets=t)
        return fp8_linear(x[:, 0], w, s, config=c, out=out, tickets=t)

    ref = fp8_linear_grouped(x, *sets[0], backend="reference") if groups > 1 else fp8_linear_ref(x[:, 0], *sets[0])
    floor = floor_bytes / dev.copy_bytes_per_s * 1e6
    variants = (fp8_variants(M, groups * N, K, dev.num_sms) if sweep
                else [Variant(default_fp8_config(M, groups * N, K, dev.num_sms), note="default")])
    timings, us = {}, {}
    for v in variants:
        label = v.label()
        out.fill_(float("nan"))  # every element must be written
        try:
            err = rel_err(run(*sets[0], v.config, v.tickets), ref)
            if not err <= 1e-2 or (tickets.any().item() if v.tickets else False):  # a NaN error is wrong too
                timings[label] = f"WRONG (rel err {err:.3g}, tickets left {int(tickets.count_nonzero())})"
                tickets.zero_()  # the next variants start from a zeroed buffer
                continue
            us[label] = graph_us([lambda w=w, s=s, v=v: run(w, s, v.config, v.tickets) for w, s in sets])
        except RuntimeError as e:  # e.g. a driver that cannot capture programmatic dependent launches
            timings[label] = f"FAILED ({type(e).__name__}: {str(e)[:200]})"
            torch.cuda.synchronize()
            tickets.zero_()
            continue
        timings[label] = floor / us[label]
    default = variants[0].label()
    w16 = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(max(2, len(sets) // 2))]
    bf16 = groups * graph_us([lambda w=w: torch.matmul(x[:, 0], w.T, out=out) for w in w16])
    # one device copy moving the same DRAM bytes (half read, half written) in the same graph rotation: what a
    # single streaming launch of this size costs here, fixed latency included (the reachable share of the floor)
    half = min(floor_bytes // 2, sets[0][0].numel())  # at most the weight's bytes (M = 256: x and y are large)
    dst = torch.empty(half, device="cuda", dtype=torch.uint8)
    copy = graph_us([lambda w=w: dst.copy_(w.view(torch.uint8).view(-1)[:half]) for w, _ in sets])
    copy *= floor_bytes / (2 * half)  # scaled to the floor's bytes
    return dict(kind="fp8 decode", name=name, M=M, N=N, K=K, us=us.get(default, float("nan")), floor_us=floor,
                of_floor=floor / us.get(default, float("inf")), bf16_us=bf16, copy_us=copy,
                of_copy=copy / us.get(default, float("inf")), sets=len(sets), config=default,
                **({"sweep": timings, "metric": "of floor"} if sweep else {}))


def fp4_experts() -> tuple[torch.Tensor, ...]:
    """V4-Flash's 256 experts, packed FP4 with ue8m0 scales (random bytes, scales 2^−8 … 2^−5)."""
    w13 = torch.randint(0, 256, (EXPERTS, 2 * INTER, DIM // 2), device="cuda", dtype=torch.uint8)
    s13 = torch.randint(119, 123, (EXPERTS, 2 * INTER, DIM // 32), device="cuda", dtype=torch.uint8)
    w2 = torch.randint(0, 256, (EXPERTS, DIM, INTER // 2), device="cuda", dtype=torch.uint8)
    s2 = torch.randint(119, 123, (EXPERTS, DIM, INTER // 32), device="cuda", dtype=torch.uint8)
    return w13, s13, w2, s2


def fp4_decode(T: int, experts: tuple[torch.Tensor, ...], dev: Device, sweep: bool) -> dict:
    per_expert = sum(t[0].numel() for t in experts)  # bytes: packed weights and scales of one expert
    g = torch.Generator(device="cuda").manual_seed(T)
    n = n_sets(per_expert * min(EXPERTS, T * TOP_K), dev.l2_bytes, most=16)
    routings = []
    for _ in range(n):
        indices = torch.rand(T, EXPERTS, device="cuda", generator=g).argsort(-1)[:, :TOP_K]
        routings.append((torch.rand(T, TOP_K, device="cuda", generator=g), indices))
    touched = sum(idx.unique().numel() for _, idx in routings) / n
    floor_bytes = touched * per_expert + 2 * T * DIM + 4 * T * TOP_K * DIM
    x = torch.randn(T, DIM, device="cuda", dtype=torch.bfloat16)
    floor = floor_bytes / dev.copy_bytes_per_s * 1e6
    default = default_moe_fp4_config(T * TOP_K, EXPERTS, x.dtype, inter=INTER, num_sms=dev.num_sms)
    configs = [default] + [c for c in MOE_CANDIDATES if c != default] if sweep else [default]
    first = moe_fp4(x, *routings[0], *experts, 10.0, config=default)
    if T <= 8:  # the reference dequantizes every expert it is given: only the touched ones here
        weights, indices = routings[0]
        touched_ids = indices.unique()  # sorted
        ref = moe_fp4_ref(x, weights, torch.searchsorted(touched_ids, indices), *(t[touched_ids] for t in experts),
                          10.0)
        err = rel_err(first, ref)
        if not err <= 1e-2:
            raise AssertionError(f"moe_fp4 T={T} default {default}: rel err {err:.3g} against moe_fp4_ref")
    timings, us = {}, {}
    for c in configs:
        err = rel_err(moe_fp4(x, *routings[0], *experts, 10.0, config=c), first)
        if not err <= 1e-2:  # a NaN error is wrong too
            timings[repr(c)] = f"WRONG (rel err {err:.3g})"
            continue
        us[repr(c)] = graph_us([lambda w=w, i=i, c=c: moe_fp4(x, w, i, *experts, 10.0, config=c) for w, i in routings])
        timings[repr(c)] = floor / us[repr(c)]
    return dict(kind="fp4 moe decode", name="routed experts", T=T, us=us.get(repr(default), float("nan")),
                floor_us=floor, of_floor=floor / us.get(repr(default), float("inf")), touched_experts=touched,
                sets=n, config=repr(default), **({"sweep": timings, "metric": "of floor"} if sweep else {}))


def fp4_prefill(T: int, experts: tuple[torch.Tensor, ...], dev: Device, sweep: bool) -> dict:
    g = torch.Generator(device="cuda").manual_seed(T)
    indices = torch.rand(T, EXPERTS, device="cuda", generator=g).argsort(-1)[:, :TOP_K]
    weights = torch.rand(T, TOP_K, device="cuda", generator=g)
    x = torch.randn(T, DIM, device="cuda", dtype=torch.bfloat16)
    us = bench_us(lambda: moe_fp4(x, weights, indices, *experts, 10.0))
    flops = 2 * T * TOP_K * 3 * INTER * DIM
    return dict(kind="fp4 moe prefill", name="routed experts", T=T, us=us, tflops=flops / us / 1e6,
                of_bf16_rate=flops / us * 1e6 / dev.bf16_flops,
                config=repr(default_moe_fp4_config(T * TOP_K, EXPERTS, torch.bfloat16)))


def cases(experts, dev: Device, sweep: bool) -> list[tuple[str, Callable[[], dict]]]:
    """(label, thunk) in run order: every default first, then the swept cases (with --sweep)."""
    out = [(f"fp4 decode T={T}", lambda T=T: fp4_decode(T, experts, dev, False)) for T in MOE_T]
    out += [(f"fp8 decode {name} M={M}", lambda a=(name, N, K, M): fp8_decode(*a, dev, False))
            for name, (N, K) in PROJECTIONS.items() for M in DECODE_M]
    out += [(f"fp8 decode {name} M={M}", lambda a=(name, N, K, M), G=G: fp8_decode(*a, dev, False, G))
            for name, (N, K, G) in GROUPED.items() for M in DECODE_M]
    out += [(f"fp8 prefill {name} M={M}", lambda a=(name, N, K, M): fp8_prefill(*a, dev, False))
            for name, (N, K) in PROJECTIONS.items() for M in PREFILL_M]
    out.append(("fp4 prefill T=8192", lambda: fp4_prefill(8192, experts, dev, False)))
    if sweep:
        out += [(f"sweep fp4 decode T={T}", lambda T=T: fp4_decode(T, experts, dev, True)) for T in SWEPT_MOE_T]
        out += [(f"sweep fp8 decode {name} M={M}", lambda a=(name, N, K, M): fp8_decode(*a, dev, True))
                for M in SWEPT_DECODE_M for name, (N, K) in PROJECTIONS.items()]
        out += [(f"sweep fp8 decode {name} M={M}", lambda a=(name, N, K, M), G=G: fp8_decode(*a, dev, True, G))
                for M in SWEPT_DECODE_M for name, (N, K, G) in GROUPED.items()]
        out += [(f"sweep fp8 prefill {name} M={M}", lambda a=(name, N, K, M): fp8_prefill(*a, dev, True))
                for M in SWEPT_PREFILL_M for name, (N, K) in PROJECTIONS.items()]
    return out


# --- compiling the candidates in parallel -----------------------------------------------------------
def compile_jobs(num_sms: int, sweep: bool, only: str | None = None) -> list[tuple]:
    """One small call per (kernel specialisation, config) the run will launch: the defaults at every case, and with
    `sweep` the candidates at each swept M (M = 1 is a specialisation of its own) and shape, FP4 at each swept T;
    with `only`, those of the kinds (fp8 decode, fp8 prefill, fp4) of the selected cases."""
    labels = [label for label, _ in cases(None, None, sweep) if only is None or only in label]
    wanted = lambda kind: any(kind in label for label in labels)  # noqa: E731
    shapes = list(PROJECTIONS.values()) + [(G * N, K) for N, K, G in GROUPED.values()]  # grouped: the same kernel
    jobs = set()
    if wanted("fp8 decode"):
        jobs |= {("fp8", M, N, K, default_fp8_config(M, N, K, num_sms)) for M in DECODE_M for N, K in shapes}
        jobs |= {("fp8", M, N, K, v.config) for M in SWEPT_DECODE_M for N, K in shapes
                 for v in fp8_variants(M, N, K, num_sms)} if sweep else set()
    if wanted("fp8 prefill"):
        jobs |= {("fp8", M, N, K, default_fp8_config(M, N, K, num_sms)) for M in PREFILL_M
                 for N, K in PROJECTIONS.values()}
        jobs |= {("fp8", M, N, K, c) for M in SWEPT_PREFILL_M for N, K in PROJECTIONS.values()
                 for c in fp8_candidates(M, N, K, num_sms)} if sweep else set()
    if wanted("fp4"):
        jobs |= {("fp4", T, 0, 0, default_moe_fp4_config(T * TOP_K, EXPERTS, torch.bfloat16, inter=INTER,
                                                          num_sms=num_sms)) for T in MOE_T}
        jobs |= {("fp4", T, 0, 0, c) for T in SWEPT_MOE_T for c in MOE_CANDIDATES} if sweep else set()
    return sorted(jobs, key=repr)


def _warm(chunk: list[tuple]) -> int:
    """Worker: run each job once on small random inputs (fills Triton's disk cache); the failures count."""
    failures = 0
    for kind, M, N, K, config in chunk:
        try:
            if kind == "fp8":
                w, s = fp8_weight(N, K)
                fp8_linear(torch.randn(M, K, device="cuda", dtype=torch.bfloat16), w, s, config=config)
            else:
                w13 = torch.zeros(8, 2 * INTER, DIM // 2, device="cuda", dtype=torch.uint8)
                s13 = torch.full((8, 2 * INTER, DIM // 32), 127, device="cuda", dtype=torch.uint8)
                w2 = torch.zeros(8, DIM, INTER // 2, device="cuda", dtype=torch.uint8)
                s2 = torch.full((8, DIM, INTER // 32), 127, device="cuda", dtype=torch.uint8)
                idx = torch.rand(M, 8, device="cuda").argsort(-1)[:, :TOP_K]  # a strided slice, as the cases'
                moe_fp4(torch.randn(M, DIM, device="cuda", dtype=torch.bfloat16),
                        torch.rand(M, TOP_K, device="cuda"), idx, w13, s13, w2, s2, 10.0, config=config)
                # the dispatch kernels specialise on the expert count and the index strides: 256 experts here
                idx = torch.rand(M, EXPERTS, device="cuda").argsort(-1)[:, :TOP_K]
                build_dispatch(idx, EXPERTS, config.block_m, backend="triton")
            torch.cuda.synchronize()
        except Exception as e:  # reported, and the main process times (and reports) the same config again
            print(f"compile/run failed: {kind} M={M} N={N} K={K} {config}: {type(e).__name__}: {e}"[:400], flush=True)
            failures += 1
    return failures


def precompile(jobs: list[tuple], workers: int) -> int:
    chunks = [jobs[i::workers] for i in range(workers)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return sum(pool.map(_warm, chunks))


# --- report -------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    lines = ["| kind | projection | M/T | N | K | µs | TFLOP/s | bf16 µs | bf16 TFLOP/s | of 2×bf16 | floor µs | "
             "of floor | copy µs | copy ÷ µs | launch config |", "|" + "---|" * 15]
    for r in rows:
        cell = {key: format(r[key], fmt) if key in r else "" for key, fmt in
                (("tflops", ".0f"), ("bf16_us", ".1f"), ("bf16_tflops", ".0f"), ("of_2x_bf16", ".0%"),
                 ("floor_us", ".1f"), ("of_floor", ".0%"), ("copy_us", ".1f"), ("of_copy", ".0%"))}
        lines.append(f"| {r['kind']} | {r['name']} | {r.get('M', r.get('T'))} | {r.get('N', '')} | {r.get('K', '')} "
                     f"| {r['us']:.1f} | {cell['tflops']} | {cell['bf16_us']} | {cell['bf16_tflops']} | "
                     f"{cell['of_2x_bf16']} | {cell['floor_us']} | {cell['of_floor']} | {cell['copy_us']} | "
                     f"{cell['of_copy']} | {r.get('config', '')} |")
    return "\n".join(lines)


def best_lines(sweeps: list[dict]) -> str:
    lines = []
    for r in sweeps:
        ok = {k: v for k, v in r["sweep"].items() if isinstance(v, float)}
        wrong = [k for k, v in r["sweep"].items() if not isinstance(v, float)]
        size = f"M={r['M']} N={r['N']} K={r['K']}" if "N" in r else f"T={r['T']}"
        default = ok.get(r["config"], float("nan"))
        if not ok:
            lines.append(f"{r['kind']} {r['name']} {size}: every candidate WRONG")
            continue
        best, value = max(ok.items(), key=lambda kv: kv[1])
        unit = "TFLOP/s" if r["metric"] == "TFLOP/s" else "of floor"
        fmt = (lambda v: f"{v:.0f}") if unit == "TFLOP/s" else (lambda v: f"{v:.0%}")
        lines.append(f"BEST {r['kind']} {r['name']} {size}: {fmt(value)} {unit} (default {fmt(default)}, "
                     f"×{value / default:.2f}) with {best}" + (f"; wrong or failed: {wrong}" if wrong else ""))
    return "\n".join(lines)


def list_plan(num_sms: int, sweep: bool, only: str | None = None) -> str:
    """What a run would launch, without a GPU: every case in run order, and for each swept FP8 decode case its
    variants with the programs each grid holds (tiles × splits) on `num_sms` SMs."""
    lines = [f"cases (run order, --sweep {'on' if sweep else 'off'}):"]
    lines += [f"  {label}" for label, _ in cases(None, None, sweep) if only is None or only in label]
    if sweep:
        shapes = [(name, N, K, 1) for name, (N, K) in PROJECTIONS.items()]
        shapes += [(name, N, K, G) for name, (N, K, G) in GROUPED.items()]
        lines.append(f"FP8 decode variants (programs on {num_sms} SMs):")
        for M in SWEPT_DECODE_M:
            for name, N, K, G in shapes:
                lines.append(f"  {name} M={M} N={G * N} K={K}:")
                for v in fp8_variants(M, G * N, K, num_sms):
                    c = v.config
                    k_blocks = -(-K // 128)
                    split = -(-k_blocks // -(-k_blocks // min(c.split_k, k_blocks)))  # as fp8_gemm launches it
                    programs = -(-M // c.block_m) * -(-N // c.block_n) * G * split
                    lines.append(f"    {programs:5d} programs  {v.label()}")
        lines.append(f"FP4 decode variants at T = {SWEPT_MOE_T}: {len(MOE_CANDIDATES)} candidates and the default")
    lines.append(f"compile jobs: {len(compile_jobs(num_sms, sweep, only))}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_pos", nargs="?", help="JSON file (same as --out)")
    parser.add_argument("--out", help="JSON file for the rows, sweeps and ceilings")
    parser.add_argument("--sweep", action="store_true", help="also time every candidate config of each swept case")
    parser.add_argument("--budget-s", type=float, default=130.0, help="start no case after this many seconds")
    parser.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1),
                        help="processes compiling the run's kernels first (0: compile as they come)")
    parser.add_argument("--only", help="run only the cases whose label contains this text (e.g. 'fp8 decode', "
                                       "'fp4', 'M=64'); --list shows the labels")
    parser.add_argument("--list", action="store_true",
                        help="print the cases and the swept variants with their grids, without a GPU, and exit")
    parser.add_argument("--num-sms", type=int, default=132, help="SMs the --list grids assume (H100/H200: 132)")
    args = parser.parse_args()
    if args.list:
        print(list_plan(args.num_sms, args.sweep, args.only))
        return
    out_path = args.out or args.out_pos or os.path.join(os.environ.get("OUT", "."), "quant.json")
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    dev = Device(copy_bandwidth(), matmul_rate(), props.L2_cache_size, props.multi_processor_count)
    head = (f"{props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB; torch "
            f"{torch.__version__}, triton {triton.__version__}; copy {dev.copy_bytes_per_s / 1e12:.2f} TB/s, bf16 "
            f"matmul {dev.bf16_flops / 1e12:.0f} TFLOP/s (8192³)")
    print(head, flush=True)
    compile_failures = 0
    if args.jobs > 0:
        jobs = compile_jobs(dev.num_sms, args.sweep, args.only)
        compile_failures = precompile(jobs, args.jobs)
        print(f"compiled {len(jobs)} launches in {time.time() - t0:.0f} s ({compile_failures} failed)",
              flush=True)
    rows, sweeps, skipped = [], [], []
    with torch.inference_mode():
        experts = fp4_experts()
        for label, thunk in cases(experts, dev, args.sweep):
            if args.only is not None and args.only not in label:
                continue
            if time.time() - t0 > args.budget_s:
                skipped.append(label)
                continue
            row = thunk()
            (sweeps if "sweep" in row else rows).append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                              if k != "sweep"}), flush=True)
    text = head + "\n\n" + table(rows)
    if sweeps:
        text += "\n\n" + best_lines(sweeps)
    if skipped:
        text += "\n\nBudget spent; not run: " + ", ".join(skipped)
    text += f"\n\nelapsed {time.time() - t0:.0f} s; JSON: {out_path}"
    print(text)
    with open(out_path, "w") as f:
        json.dump(dict(device=props.name, **dataclasses.asdict(dev), rows=rows, sweeps=sweeps, skipped=skipped,
                       compile_failures=compile_failures, elapsed_s=time.time() - t0), f, indent=1)


if __name__ == "__main__":
    main()
