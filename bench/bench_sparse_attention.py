"""Benchmark of kernels/sparse_attention.py on the GPU: time vs the floor measured in the same run.

Floor = max(bytes / copy bandwidth, FLOPs / bf16 matmul rate), with bytes = each gathered kv row once per
token (1,024 bytes a bf16 row, 584 an FP8 KV row: kernels/kv_rows.py) + q and out once, FLOPs = 4·T·H·K·D,
the copy bandwidth from a large device-to-device copy and the matmul rate from a large torch.matmul, both
measured here. Kernel times are medians of CUDA-event timings
of a CUDA graph that replays one call per rotated input set (enough sets to touch 2× the L2, so every
gather comes from DRAM as in decode), divided by the number of sets; the graph is how decode runs. The
reference is timed with triton.testing.do_bench (median). Indices: K distinct random rows per token from
a pool of 8× the L2. `--rows fp8|bf16|both` picks the KV row formats (both by default: FP8 KV rows, the
engine's format, then bf16 rows); a default launch that splits the keys is also timed with `fused_merge` (the
split merge done by the last program of each head block: one launch instead of two); `--sweep` also times
launch variants and reports the best; `--json PATH` writes every row. FP8 rows are also timed at the bf16 rows'
tiles ("FP8 at bf16 tiles": the FP8 table before 2026-12-06, fitted to shared memory), which spilled registers on
sm_90. FP8 rows are also timed at the default tile with each other dequantization of SparseAttnConfig.dequant
("FP8 cvt": the codes converted as float8e4nv, the scale applied to the tile; "FP8 cvt_chunks": the scales kept out
of the tile by chunked dots; the default "bits" decodes the code bits with integer ops), and `--sweep` times every
variant tile with each of the three. `--quick` times only the issue's target shapes; `--out DIR` writes attn.json
and attn.md there.

    python3 bench/bench_sparse_attention.py [--rows both] [--quick] [--sweep] [--budget-s 300] [--out $OUT/attn]
    python3 bench/bench_sparse_attention.py --quick --rows fp8 --sweep --budget-s 400 --out $OUT/attn   # dequant
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import time

import torch
import triton
import triton.language as tl

from sparsepd.kernels.kv_rows import KVRowLayout, pack_kv_rows
from sparsepd.kernels.sparse_attention import (
    DEQUANT_MODES,
    SparseAttnConfig,
    _sparse_attn_fwd,
    default_config,
    fit_shared_memory,
    sparse_attn,
    sparse_attn_ref,
)

D = 512
DECODE = [(T, H, K) for K in (1152, 640) for H in (16, 64, 128) for T in (1, 8, 32, 64, 128, 256)]
PREFILL = [(T, 64, K) for K in (1152, 640) for T in (2048, 8192)]
# --quick: the shapes of the issue's targets (H = 64 T ≥ 32, H = 128 T ≥ 64, T = 1, prefill T = 8192 H = 64)
QUICK_DECODE = [(1, 64, 1152), (1, 128, 1152), (32, 64, 1152), (128, 64, 1152), (64, 128, 1152), (128, 128, 1152)]
QUICK_PREFILL = [(8192, 64, 1152)]


def median_ms(fn, reps=20) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms_per_call(calls, reps=20) -> float:
    """Median time of one call, from a CUDA graph that runs each of `calls` once."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    return median_ms(graph.replay, reps) / len(calls)


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting read + write."""
    src = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * (1 << 30) / (triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3)


def matmul_rate(n=8192) -> float:
    """FLOP/s of an n×n×n bf16 torch.matmul on random data."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    return 2 * n**3 / (triton.testing.do_bench(lambda: torch.matmul(a, b, out=c), return_mode="median") * 1e-3)


@triton.jit
def _gather_one_row(idx_ptr, kv_ptr, out_ptr, D: tl.constexpr):
    row = tl.load(idx_ptr)
    tl.store(out_ptr + tl.arange(0, D), tl.load(kv_ptr + row.to(tl.int64) * D + tl.arange(0, D)))


def launch_floor_us(pool) -> float:
    """One tiny launch that reads an index and then the row it names: the least any T = 1 call costs."""
    idx = torch.randint(0, pool.shape[0], (128, 1), device="cuda", dtype=torch.int32)
    out = torch.empty(D, device="cuda", dtype=pool.dtype)
    calls = [lambda i=i: _gather_one_row[(1,)](idx[i], pool, out, D=D) for i in range(128)]
    return graph_ms_per_call(calls) * 1e3


def random_rows(n_tokens, K, R, device) -> torch.Tensor:
    """[n_tokens, K] int32: K distinct random rows per token."""
    out = torch.empty(n_tokens, K, dtype=torch.int32, device=device)
    step = max(1, (1 << 27) // R)
    for t0 in range(0, n_tokens, step):
        n = min(step, n_tokens - t0)
        out[t0:t0 + n] = torch.rand(n, R, device=device).topk(K, dim=1).indices.to(torch.int32)
    return out


def row_bytes(layout) -> int:
    return layout.row_bytes if layout is not None else D * 2


def make_sets(T, H, K, pool, l2_bytes, shared_keys=1, layout=None):
    """Input sets to rotate: enough that one pass touches 2× the L2."""
    per_call = T * K * row_bytes(layout) + 2 * T * H * D * 2
    n_sets = max(1, min(128, math.ceil(2 * l2_bytes / per_call)))
    idx = random_rows(n_sets * T // shared_keys, K, pool.shape[0], "cuda")
    idx = idx.repeat_interleave(shared_keys, dim=0).view(n_sets, T, K)
    q = torch.randn(n_sets, T, H, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    lse = torch.empty(n_sets, T, H, device="cuda", dtype=torch.float32)
    sink = torch.randn(H, device="cuda")
    return [(q[i], idx[i], sink, out[i], lse[i]) for i in range(n_sets)]


def check(sets, pool, config, ref, layout=None) -> None:
    """A config that breaks the result is not timed: rel. error of one call vs the fp32 reference."""
    q, idx, sink, _, _ = sets[0]
    out, lse = sparse_attn(q, pool, idx, sink, D ** -0.5, config=config, kv_layout=layout)
    err = ((out.float() - ref[0].float()).norm() / ref[0].float().norm()).item()
    err_lse = ((lse - ref[1]).norm() / ref[1].norm()).item()
    if not (err <= 1e-2 and err_lse <= 1e-3):
        raise AssertionError(f"config {config} is wrong: rel err out {err:.2e} lse {err_lse:.2e}")


def time_config(sets, pool, config, layout=None) -> float:
    T, H = sets[0][0].shape[:2]
    tickets = [torch.zeros(T * triton.cdiv(H, config.block_h), dtype=torch.int32, device="cuda") for _ in sets]
    calls = [lambda s=s, tk=tk: sparse_attn(s[0], pool, s[1], s[2], D ** -0.5, s[3], s[4], config=config,
                                            kv_layout=layout, tickets=tk)
             for s, tk in zip(sets, tickets, strict=True)]
    return graph_ms_per_call(calls) * 1e3


def variants(T, H, K, num_sms, dequants=("bits",)):
    """Launch variants for the sweep: head blocking, key block, warps, stages, skip_empty, split count, and for FP8
    KV rows each of `dequants` (SparseAttnConfig.dequant) at every tile, one after another."""
    shapes = {64: [(32, 8, 3, True), (32, 8, 4, True), (32, 8, 3, False), (64, 8, 2, True), (64, 8, 2, False),
                   (16, 8, 3, True), (16, 8, 4, True)],
              32: [(32, 4, 3, False), (32, 8, 3, True)],
              16: [(32, 4, 3, False), (32, 4, 4, False), (64, 4, 3, False), (32, 8, 3, False), (16, 8, 3, False),
                   (64, 8, 2, False)]}
    out = []
    for bh, combos in shapes.items():
        if bh > max(16, triton.next_power_of_2(H)):
            continue
        programs = T * triton.cdiv(H, bh)
        # num_sms // programs: one round of programs where a tile holds a whole SM (FP8 rows' 8-warp tiles)
        splits = [s for s in (1, 2, 4, 8, 16, num_sms // programs, K // 32)
                  if s == 1 or (1 <= programs * s <= 3 * num_sms and s <= K // 32)]
        out += [SparseAttnConfig(bh, bn, s, w, st, skip, dequant=dq) for bn, w, st, skip in combos
                for s in sorted(set(splits)) for dq in dequants]
        out += [SparseAttnConfig(bh, bn, s, w, st, skip, fused_merge=True, dequant=dq) for bn, w, st, skip in combos
                for s in sorted(set(splits)) if s > 1 for dq in dequants]
    return out


def floor_us(T, H, K, bw, rate, layout=None) -> tuple[float, str]:
    num_bytes = T * K * row_bytes(layout) + 2 * T * H * D * 2
    flops = 4 * T * H * K * D
    t_bytes, t_flops = num_bytes / bw * 1e6, flops / rate * 1e6
    return (t_bytes, "bytes") if t_bytes >= t_flops else (t_flops, "flops")


def run_case(kind, T, H, K, pool, ctx, shared_keys=1, layout=None):
    sets = make_sets(T, H, K, pool, ctx["l2"], shared_keys, layout)
    q, idx, sink, _, _ = sets[0]
    ref = sparse_attn_ref(q, pool, idx, sink, D ** -0.5, kv_layout=layout)
    t_ref = triton.testing.do_bench(lambda: sparse_attn_ref(q, pool, idx, sink, D ** -0.5, kv_layout=layout),
                                    return_mode="median") * 1e3
    default = default_config(T, H, K, D, ctx["sms"], fp8_rows=layout is not None, kv_layout=layout,
                             smem_limit=ctx["smem"])
    check(sets, pool, default, ref, layout)
    t_default = time_config(sets, pool, default, layout)
    t_prev = None
    if layout is not None:
        # FP8 rows at the bf16 rows' tiles (the FP8 table before 2026-12-06; they spilled registers on sm_90)
        prev = fit_shared_memory(default_config(T, H, K, D, ctx["sms"]), D, 2, layout, ctx["smem"])
        if prev != default:
            check(sets, pool, prev, ref, layout)
            t_prev = time_config(sets, pool, prev, layout)
    t_fused = None
    if default.num_splits > 1:  # the same launch with the merge in the last program of each head block
        fused = dataclasses.replace(default, fused_merge=True)
        check(sets, pool, fused, ref, layout)
        t_fused = time_config(sets, pool, fused, layout)
    t_dequant = {}
    if layout is not None:  # the default tile with each other FP8 dequantization (SparseAttnConfig.dequant)
        for mode in DEQUANT_MODES:
            if mode != default.dequant:
                other = dataclasses.replace(default, dequant=mode)
                check(sets, pool, other, ref, layout)
                t_dequant[mode] = time_config(sets, pool, other, layout)
    best, t_best = default, t_default
    if ctx["sweep"]:
        dequants = ctx["dequants"] if layout is not None else ("bits",)
        for config in variants(T, H, K, ctx["sms"], dequants):
            if time.monotonic() > ctx["deadline"]:
                break
            try:
                check(sets, pool, config, ref, layout)
                t = time_config(sets, pool, config, layout)
            except (triton.runtime.errors.OutOfResources, AssertionError, ValueError) as err:
                print(f"  skip {config}: {str(err)[:120]}")
                continue
            print(f"  {kind} T={T} H={H} K={K} {fmt_cfg(config)}: {t:.2f} us", flush=True)
            if t < t_best:
                best, t_best = config, t
    fl, bound = floor_us(T, H, K, ctx["bw"], ctx["rate"], layout)
    row = dict(kind=kind, rows="fp8" if layout else "bf16", T=T, H=H, K=K, t=t_default, t_fused=t_fused, t_prev=t_prev,
               t_dequant=t_dequant, floor=fl, bound=bound, ref=t_ref, best=t_best,
               best_cfg=best, default_cfg=default)
    print_table([row], ctx["rate"], header=not ctx["printed"])
    ctx["printed"] = True
    return row


def fmt_cfg(c: SparseAttnConfig) -> str:
    skip = "/skip" if c.skip_empty else ""
    fused = "/fused" if c.fused_merge else ""
    dequant = "" if c.dequant == "bits" else f"/{c.dequant}"
    return f"h{c.block_h}/n{c.block_n}/s{c.num_splits}/w{c.num_warps}/st{c.num_stages}{skip}{fused}{dequant}"


def print_table(rows, rate, header=True, file=None):
    if header:
        print("\n| case | rows | T | H | K | time µs | fused-merge µs | FP8 at bf16 tiles µs | FP8 cvt µs "
              "| FP8 cvt_chunks µs "
              "| floor µs (bound) | % of floor | TFLOP/s | % of mm rate | ref µs | × ref | config "
              "| best variant µs (config) |", file=file)
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", file=file)
    for r in rows:
        tflops = 4 * r["T"] * r["H"] * r["K"] * D / (r["t"] * 1e-6) / 1e12
        fused = "—" if r["t_fused"] is None else f"{r['t_fused']:.2f}"
        prev = "—" if r.get("t_prev") is None else f"{r['t_prev']:.2f}"
        dq = " | ".join("—" if r["t_dequant"].get(m) is None else f"{r['t_dequant'][m]:.2f}"
                        for m in ("cvt", "cvt_chunks"))
        print(f"| {r['kind']} | {r['rows']} | {r['T']} | {r['H']} | {r['K']} | {r['t']:.2f} | {fused} | {prev} | {dq} "
              f"| {r['floor']:.2f} ({r['bound']}) | {100 * r['floor'] / r['t']:.0f}% | {tflops:.0f} "
              f"| {100 * tflops * 1e12 / rate:.0f}% "
              f"| {r['ref']:.0f} | {r['ref'] / r['t']:.0f}× | {fmt_cfg(r['default_cfg'])} "
              f"| {r['best']:.2f} ({fmt_cfg(r['best_cfg'])}) |", file=file)


def print_resources():
    """The compiler's report for every compiled variant of the main kernel."""
    print("\nresources of _sparse_attn_fwd variants (regs/thread, spills, shared bytes):")
    names = _sparse_attn_fwd.arg_names
    for cache in _sparse_attn_fwd.device_caches.values():
        for kernel in cache[0].values():
            try:
                consts = {}
                for k, v in getattr(kernel.src, "constants", {}).items():
                    name = names[k[0]] if isinstance(k, tuple) else str(k)
                    if name in ("BLOCK_H", "BLOCK_N", "SPLIT", "D", "FP8_ROWS", "DEQUANT"):
                        consts[name] = v
                meta = kernel.metadata
                print(f"  {consts} warps={meta.num_warps} stages={meta.num_stages}: regs={kernel.n_regs} "
                      f"spills={kernel.n_spills} shared={meta.shared}")
            except Exception as err:  # the report is best effort; never lose the timings to it
                print(f"  (no report: {err})")


def profile(T, H, K, configs) -> None:
    """One call per config on fresh inputs, for a profiler to capture (e.g. ncu -k regex:_sparse_attn_fwd)."""
    props = torch.cuda.get_device_properties(0)
    pool = torch.randn(8 * props.L2_cache_size // (2 * D), D, device="cuda", dtype=torch.bfloat16)
    q, idx, sink, out, lse = make_sets(T, H, K, pool, 0)[0]
    for config in configs:
        sparse_attn(q, pool, idx, sink, D ** -0.5, out, lse, config=config)
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time launch variants")
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop sweeping after this many seconds")
    parser.add_argument("--profile", type=int, nargs=3, metavar=("T", "H", "K"),
                        help="only run the 64-head configs once each at this shape (for a profiler)")
    parser.add_argument("--rows", choices=("fp8", "bf16", "both"), default="both", help="KV row formats to time")
    parser.add_argument("--json", help="write every row here (JSON)")
    parser.add_argument("--quick", action="store_true", help="only the issue's target shapes (about 40 s)")
    parser.add_argument("--out", help="write attn.json and attn.md (the table) into this folder")
    parser.add_argument("--dequant", default=",".join(DEQUANT_MODES),
                        help="FP8 dequantizations the sweep times at every tile (comma-separated, of "
                             f"{', '.join(DEQUANT_MODES)})")
    args = parser.parse_args()
    dequants = tuple(args.dequant.split(","))
    if not dequants or set(dequants) - set(DEQUANT_MODES):
        parser.error(f"--dequant takes a comma-separated list of {DEQUANT_MODES}, got {args.dequant!r}")
    if args.profile:
        profile(*args.profile, [SparseAttnConfig(64, 32, 1, 8, 3, True), SparseAttnConfig(64, 32, 1, 8, 3, False)])
        return
    props = torch.cuda.get_device_properties(0)
    bw, rate = copy_bandwidth(), matmul_rate()
    print(f"device: {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB; "
          f"torch {torch.__version__}, triton {triton.__version__}")
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write), bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    pool = torch.randn(8 * props.L2_cache_size // (2 * D), D, device="cuda", dtype=torch.bfloat16)  # [R, D]
    layout = KVRowLayout(D, 64, torch.bfloat16)
    formats = {"fp8": (pack_kv_rows(pool, layout), layout), "bf16": (pool, None)}  # FP8: the same rows, rounded
    chosen = ["fp8", "bf16"] if args.rows == "both" else [args.rows]
    print(f"pool {pool.shape[0]} rows ({pool.numel() * 2 >> 20} MiB bf16, {pool.shape[0] * layout.row_bytes >> 20} "
          f"MiB FP8); one-row launch floor {launch_floor_us(pool):.2f} µs per call in a graph")
    ctx = dict(l2=props.L2_cache_size, sms=props.multi_processor_count, bw=bw, rate=rate, sweep=args.sweep,
               smem=props.shared_memory_per_block_optin, dequants=dequants,
               deadline=time.monotonic() + args.budget_s, printed=False)
    rows = []
    for name in chosen:
        kv, kv_layout = formats[name]
        for T, H, K in QUICK_DECODE if args.quick else DECODE:
            rows.append(run_case("decode", T, H, K, kv, ctx, layout=kv_layout))
            print(f"decode {name} T={T} H={H} K={K}: {rows[-1]['t']:.2f} us, best {rows[-1]['best']:.2f}", flush=True)
        for T, H, K in QUICK_PREFILL if args.quick else PREFILL:
            rows.append(run_case("prefill", T, H, K, kv, ctx, layout=kv_layout))
            print(f"prefill {name} T={T} H={H} K={K}: {rows[-1]['t']:.2f} us", flush=True)
        if not args.quick:
            rows.append(run_case("prefill, keys shared by 64 tokens", 8192, 64, 1152, kv, ctx, shared_keys=64,
                                 layout=kv_layout))
    print_resources()
    print_table(rows, rate)
    plain = [{k: (fmt_cfg(v) if isinstance(v, SparseAttnConfig) else v) for k, v in r.items()} for r in rows]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "attn.md"), "w") as f:
            print(f"{props.name}; copy {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s; triton "
                  f"{triton.__version__}", file=f)
            print_table(rows, rate, file=f)
        args.json = args.json or os.path.join(args.out, "attn.json")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plain, f, indent=1)


if __name__ == "__main__":
    main()
