"""Benchmark of the quantized-weight kernels on the GPU: kernels/fp8_gemm.py and kernels/moe.py's FP4 experts.

FP8 GEMM (`fp8_linear`, activation quantization included) at V4-Flash's projection shapes (model/attention.py and
the shared expert, dims from sparsepd/model_config.py's v4-flash preset: dim 4096, 64 heads × 512, q_lora 1024,
8 output groups × o_lora 1024, moe_inter 2048), bf16 activations:
- prefill, M ∈ {4096, 8192}: TFLOP/s against torch's bf16 matmul of the same shape (F.linear, bf16 weights) in the
  same run; target (issue 28) ≥ 70% of 2 × the bf16 rate;
- decode, M ∈ {1, 8, 64, 256}: time against the floor of the bytes it must move (FP8 weights + scales, x, y) at
  the copy bandwidth measured here; target ≥ 70% of the floor (floor / time). torch's bf16 F.linear beside it.
FP4 experts (`moe_fp4`) at decode, T ∈ {1, 8, 64, 256}, V4-Flash's experts (256 × [2·2048, 4096] and
[4096, 2048], top-6, random routing with distinct experts a token): time against the floor of the bytes it reads
(the packed weights and scales of every touched expert once, x, the fp32 per-slot outputs written); target ≥ 60%.

Timing: decode calls are captured in a CUDA graph that makes one call per rotated input set (distinct weight copies
or routings, enough to move ≥ 2× the L2), the median replay (triton.testing.do_bench) divided by the number of
calls: how decode runs, weights from DRAM. Prefill uses do_bench's median (it clears the L2 before each call).
Ceilings measured in the same run: copy bandwidth (1 GiB device-to-device, read + write), bf16 matmul (8192³).

    python3 bench/bench_quant.py OUT.json [--sweep] [--budget-s 170]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton

from sparsepd.kernels.fp8_gemm import Fp8GemmConfig, choose_split_k, default_fp8_config, fp8_linear
from sparsepd.kernels.moe import MoEConfig, default_moe_fp4_config, moe_fp4

DIM, HEADS, HEAD_DIM, Q_LORA, O_GROUPS, O_LORA, INTER, EXPERTS, TOP_K = 4096, 64, 512, 1024, 8, 1024, 2048, 256, 6
PROJECTIONS = {  # name: (N, K)
    "wq_a": (Q_LORA, DIM), "wq_b": (HEADS * HEAD_DIM, Q_LORA), "wkv": (HEAD_DIM, DIM),
    "wo_a (a group)": (O_LORA, HEADS * HEAD_DIM // O_GROUPS), "wo_b": (DIM, O_GROUPS * O_LORA),
    "shared w1+w3": (2 * INTER, DIM), "shared w2": (DIM, INTER),
}
PREFILL_M, DECODE_M, MOE_T = (4096, 8192), (1, 8, 64, 256), (1, 8, 64, 256)
PREFILL_SWEEP = [Fp8GemmConfig(128, 128, num_warps=8, num_stages=4, rescale=True),
                 Fp8GemmConfig(128, 128, num_warps=8, num_stages=3),
                 Fp8GemmConfig(128, 128, num_warps=4, num_stages=4, rescale=True),
                 Fp8GemmConfig(256, 128, num_warps=8, num_stages=3, rescale=True),
                 Fp8GemmConfig(128, 64, num_warps=4, num_stages=5, rescale=True)]
DECODE_SWEEP = [dict(block_n=32, num_stages=8), dict(block_n=64, num_stages=6), dict(block_n=128, num_stages=4),
                dict(block_n=64, num_stages=4, split_k=1), dict(quant_a=False), dict(swap_ab=False)]
MOE_SWEEP = [MoEConfig(16, 64, 256, 4, 3), MoEConfig(16, 64, 256, 4, 3, fp4_unpack="bits"),
             MoEConfig(16, 64, 256, 4, 3, fp4_unpack="ptx"), MoEConfig(16, 32, 256, 4, 4, fp4_unpack="ptx"),
             MoEConfig(16, 32, 256, 4, 4), MoEConfig(16, 128, 128, 4, 4), MoEConfig(16, 64, 512, 8, 2)]


@dataclass(frozen=True, slots=True)
class Device:
    """What the floors are measured against, from this run."""

    copy_bytes_per_s: float
    bf16_flops: float
    l2_bytes: int
    num_sms: int


def bench_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def graph_us(calls) -> float:
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


def matmul_rate(n=8192) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    return 2 * n**3 / (bench_us(lambda: torch.matmul(a, b, out=c)) * 1e-6)


def fp8_weight(N: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = (torch.randn(N, K, device="cuda") * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.exp2(torch.randint(-12, -6, (-(-N // 128), -(-K // 128)), device="cuda").float())
    return w, scale


def n_sets(set_bytes: int, l2_bytes: int, most: int = 64) -> int:
    return max(2, min(most, -(-2 * l2_bytes // set_bytes)))


def fp8_prefill(name, N, K, M, dev: Device, sweep) -> dict:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w, scale = fp8_weight(N, K)
    w16 = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    flops = 2 * M * N * K
    ours = bench_us(lambda: fp8_linear(x, w, scale))
    bf16 = bench_us(lambda: F.linear(x, w16))
    row = dict(kind="fp8 prefill", name=name, M=M, N=N, K=K, us=ours, tflops=flops / ours / 1e6,
               bf16_us=bf16, bf16_tflops=flops / bf16 / 1e6, config=str(default_fp8_config(M, N, K, dev.num_sms)))
    row["of_2x_bf16"] = row["tflops"] / (2 * row["bf16_tflops"])
    if sweep:
        row["sweep"] = {str(c): flops / bench_us(lambda c=c: fp8_linear(x, w, scale, config=c)) / 1e6
                        for c in PREFILL_SWEEP}
    return row


def fp8_decode(name, N, K, M, dev: Device, sweep) -> dict:
    weight_bytes = N * K + 4 * (-(-N // 128)) * (-(-K // 128))
    floor_bytes = weight_bytes + 2 * M * K + 2 * M * N
    sets = [fp8_weight(N, K) for _ in range(n_sets(weight_bytes, dev.l2_bytes))]
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)

    def timed(config=None):
        return graph_us([lambda w=w, s=s: fp8_linear(x, w, s, config=config, out=out) for w, s in sets])

    ours = timed()
    w16 = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(max(2, len(sets) // 2))]
    bf16 = graph_us([lambda w=w: torch.matmul(x, w.T, out=out) for w in w16])
    floor = floor_bytes / dev.copy_bytes_per_s * 1e6
    config = default_fp8_config(M, N, K, dev.num_sms)
    row = dict(kind="fp8 decode", name=name, M=M, N=N, K=K, us=ours, floor_us=floor, of_floor=floor / ours,
               bf16_us=bf16, sets=len(sets), config=str(config))
    if sweep:
        variants = {}
        for change in DECODE_SWEEP:
            c = dataclasses.replace(config, **change)
            if "split_k" not in change:  # the split for the new tile width
                c = dataclasses.replace(c, split_k=choose_split_k(M, N, K, c.block_m, c.block_n, dev.num_sms))
            variants[str(c)] = floor / timed(c)
        row["sweep"] = variants
    return row


def fp4_experts():
    """V4-Flash's 256 experts, packed FP4 with ue8m0 scales (random bytes, scales 2^−8 … 2^−5)."""
    w13 = torch.randint(0, 256, (EXPERTS, 2 * INTER, DIM // 2), device="cuda", dtype=torch.uint8)
    s13 = torch.randint(119, 123, (EXPERTS, 2 * INTER, DIM // 32), device="cuda", dtype=torch.uint8)
    w2 = torch.randint(0, 256, (EXPERTS, DIM, INTER // 2), device="cuda", dtype=torch.uint8)
    s2 = torch.randint(119, 123, (EXPERTS, DIM, INTER // 32), device="cuda", dtype=torch.uint8)
    return w13, s13, w2, s2


def fp4_decode(T, experts, dev: Device, sweep) -> dict:
    per_expert = sum(t[0].numel() for t in experts)  # bytes: packed weights and scales of one expert
    g = torch.Generator(device="cuda").manual_seed(T)
    n = n_sets(per_expert * min(EXPERTS, T * TOP_K), dev.l2_bytes, most=16)
    routings = []
    for _ in range(n):
        indices = torch.rand(T, EXPERTS, device="cuda", generator=g).argsort(-1)[:, :TOP_K]
        weights = torch.rand(T, TOP_K, device="cuda", generator=g)
        routings.append((weights, indices))
    touched = sum(idx.unique().numel() for _, idx in routings) / n
    floor_bytes = touched * per_expert + 2 * T * DIM + 4 * T * TOP_K * DIM
    x = torch.randn(T, DIM, device="cuda", dtype=torch.bfloat16)

    def timed(config=None):
        return graph_us([lambda w=w, i=i: moe_fp4(x, w, i, *experts, 10.0, config=config) for w, i in routings])

    ours = timed()
    floor = floor_bytes / dev.copy_bytes_per_s * 1e6
    row = dict(kind="fp4 moe decode", name="routed experts", T=T, us=ours, floor_us=floor, of_floor=floor / ours,
               touched_experts=touched, sets=n,
               config=str(default_moe_fp4_config(T * TOP_K, EXPERTS, torch.bfloat16)))
    if sweep:
        row["sweep"] = {str(c): floor / timed(c) for c in MOE_SWEEP}
    return row


def fp4_prefill(T, experts, dev: Device) -> dict:
    g = torch.Generator(device="cuda").manual_seed(T)
    indices = torch.rand(T, EXPERTS, device="cuda", generator=g).argsort(-1)[:, :TOP_K]
    weights = torch.rand(T, TOP_K, device="cuda", generator=g)
    x = torch.randn(T, DIM, device="cuda", dtype=torch.bfloat16)
    us = bench_us(lambda: moe_fp4(x, weights, indices, *experts, 10.0))
    flops = 2 * T * TOP_K * 3 * INTER * DIM
    return dict(kind="fp4 moe prefill", name="routed experts", T=T, us=us, tflops=flops / us / 1e6,
                of_bf16_rate=flops / us * 1e6 / dev.bf16_flops)


def table(rows: list[dict]) -> str:
    lines = ["| kind | projection | M/T | N | K | µs | TFLOP/s | bf16 µs | bf16 TFLOP/s | of 2×bf16 | floor µs | "
             "of floor | launch config |", "|" + "---|" * 13]
    for r in rows:
        cell = {key: format(r[key], fmt) if key in r else "" for key, fmt in
                (("tflops", ".0f"), ("bf16_us", ".1f"), ("bf16_tflops", ".0f"), ("of_2x_bf16", ".0%"),
                 ("floor_us", ".1f"), ("of_floor", ".0%"))}
        lines.append(f"| {r['kind']} | {r['name']} | {r.get('M', r.get('T'))} | {r.get('N', '')} | {r.get('K', '')} "
                     f"| {r['us']:.1f} | {cell['tflops']} | {cell['bf16_us']} | {cell['bf16_tflops']} | "
                     f"{cell['of_2x_bf16']} | {cell['floor_us']} | {cell['of_floor']} | {r.get('config', '')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", help="JSON file for the rows and ceilings")
    parser.add_argument("--sweep", action="store_true", help="also time launch variants (best reported)")
    parser.add_argument("--budget-s", type=float, default=170.0, help="stop starting new cases after this")
    args = parser.parse_args()
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    dev = Device(copy_bandwidth(), matmul_rate(), props.L2_cache_size, props.multi_processor_count)
    head = (f"{props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB; torch "
            f"{torch.__version__}, triton {triton.__version__}; copy {dev.copy_bytes_per_s / 1e12:.2f} TB/s, bf16 "
            f"matmul {dev.bf16_flops / 1e12:.0f} TFLOP/s (8192³)")
    print(head, flush=True)
    rows, sweeps, skipped = [], [], []

    def run(label, fn, *a, into=rows):
        if time.time() - t0 > args.budget_s:
            skipped.append(label)
            return
        row = fn(*a)
        into.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    with torch.inference_mode():
        experts = fp4_experts()
        # every default launch first; the launch variants with what budget is left
        cases = [(f"fp4 decode T={T}", fp4_decode, (T, experts, dev), T in (1, 64)) for T in MOE_T]
        cases += [(f"fp8 decode {name} M={M}", fp8_decode, (name, N, K, M, dev), M in (1, 64))
                  for name, (N, K) in PROJECTIONS.items() for M in DECODE_M]
        cases += [(f"fp8 prefill {name} M={M}", fp8_prefill, (name, N, K, M, dev), M == 8192)
                  for name, (N, K) in PROJECTIONS.items() for M in PREFILL_M]
        for label, fn, a, _ in cases:
            run(label, fn, *a, False)
        run("fp4 prefill T=8192", fp4_prefill, 8192, experts, dev)
        if args.sweep:
            for label, fn, a, swept in cases:
                if swept:
                    run(f"sweep {label}", fn, *a, True, into=sweeps)
    text = head + "\n\n" + table(rows)
    for r in sweeps:
        best = max(r["sweep"].items(), key=lambda kv: kv[1])
        what, default = ("of floor", r["of_floor"]) if "floor_us" in r else ("TFLOP/s", r["tflops"])
        text += (f"\nsweep {r['kind']} {r['name']} {r.get('M', r.get('T'))}: default {default:.3g}, "
                 f"best {best[1]:.3g} {what} with {best[0]}")
    if skipped:
        text += "\n\nBudget spent; not run: " + ", ".join(skipped)
    print(text)
    with open(args.out, "w") as f:
        json.dump(dict(device=props.name, **dataclasses.asdict(dev), rows=rows, sweeps=sweeps,
                       skipped=skipped, elapsed_s=time.time() - t0), f, indent=1)


if __name__ == "__main__":
    main()
