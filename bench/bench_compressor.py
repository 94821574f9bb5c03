"""Benchmark of kernels/compressor.py and kernels/state_update.py on the GPU: time vs the floor measured in
the same run.

V4 dims: main compressors d = 512 (rope 64, FP8 round trip on the nope dims, written as 584-byte FP8 KV rows,
kernels/kv_rows.py, the engine's format) at ratio 4 with
overlap (CSA) and ratio 128 (HCA); the indexer's compressor d = 128 at ratio 4 with overlap (FP8 cache rows).
Batches: prefill 8 requests × 4096 new tokens from position 0; decode 128 requests of one token at random
positions in [4096, 65536) with fixed-capacity plans (capacity 128, −1 rows), as a CUDA graph replays them.

Floor = max(bytes / copy bandwidth, FLOPs / bf16 matmul rate), both measured here (1 GiB device-to-device
copy counting read + write; 8192³ torch.matmul on random data). Bytes: compressor = every window row read
once (W rows × d channels × 8 B of kv + score per entry: in a prefill, each projected row exactly once) +
each entry written once (a 584 B FP8 KV row, or a 144 B indexer row); state write = each saved row read and
written once (coff·d × 4 B × 2 tensors × 2); SWA write = each 584 B FP8 KV row read and written once. FLOPs: the
indexer's Hadamard product, 2·128² per entry (negligible elsewhere).

Timing: a CUDA graph running one call per rotated input set (own rows, rings and plan per set, enough sets
to touch 2× the L2; at least 4 calls), median of 20 replays / calls: device time without the host's launch
overhead (the wrappers' Python checks cost more than the small kernels). The reference (`*_ref`, vectorized
PyTorch, eager) with triton.testing.do_bench (median).
Launches per call are counted with the profiler. Every config is first checked against the reference.

    python3 bench/bench_compressor.py [--sweep] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
import triton

from sparsepd.kernels.compress_plan import build_compress_plan, build_write_plan
from sparsepd.kernels.compressor import (
    CompressConfig,
    compress_indexer,
    compress_indexer_ref,
    compress_main,
    compress_main_ref,
    default_config,
    window_splits,
)
from sparsepd.kernels.kv_rows import KVRowLayout, pack_kv_rows, unpack_kv_rows
from sparsepd.kernels.state_update import compressor_state_write, compressor_state_write_ref, swa_ring_write

L2_BYTES = 50 << 20
D_MAIN, D_INDEX, ROPE, WINDOW = 512, 128, 64, 128
ROWS = KVRowLayout(D_MAIN, ROPE, torch.bfloat16)  # the main cache's FP8 KV rows (584 bytes)
KINDS = {  # name: (ratio, overlap, d, indexer)
    "CSA main": (4, True, D_MAIN, False),
    "HCA main": (128, False, D_MAIN, False),
    "indexer": (4, True, D_INDEX, True),
}
SWEEP = {
    "CSA main": [CompressConfig(1, 8, 4), CompressConfig(1, 8, 2), CompressConfig(1, 4, 4), CompressConfig(1, 8, 8),
                 CompressConfig(2, 8, 4)],
    "HCA main": [CompressConfig(1, 8, 4), CompressConfig(1, 16, 4), CompressConfig(1, 8, 2), CompressConfig(1, 16, 2),
                 CompressConfig(1, 32, 4), CompressConfig(1, 4, 4)],
    "indexer": [CompressConfig(1, 8, 1), CompressConfig(1, 8, 2), CompressConfig(1, 4, 1), CompressConfig(2, 8, 2),
                CompressConfig(1, 8, 4), CompressConfig(4, 8, 4)],
}


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


def graph_us_per_call(calls) -> float:
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    return median_ms(graph.replay) / len(calls) * 1e3


def graph_us(sets, fn, min_calls=4) -> float:
    """µs per call of fn(set) in a CUDA graph cycling through the rotated input sets."""
    calls = [lambda s=s: fn(s) for s in sets]
    calls = calls * -(-min_calls // len(calls))
    return graph_us_per_call(calls)


def bench_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=80, return_mode="median") * 1e3


def copy_bandwidth() -> float:
    src = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=20, rep=200, return_mode="median")
    return 2 * src.numel() * 2 / (ms * 1e-3)


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=20, rep=200, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3)


def kernel_launches(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "Memcpy" not in e.name
               and "Memset" not in e.name)


class Inputs:
    """One input set of a compressor kind for one batch."""

    def __init__(self, kind: str, starts, num_new, capacity, seed, cache=None):
        ratio, overlap, d, indexer = KINDS[kind]
        g = torch.Generator(device="cuda").manual_seed(seed)
        coff = 2 if overlap else 1
        W, C, B = coff * ratio, coff * d, len(starts)
        N = sum(num_new)
        self.kind, self.d, self.indexer = kind, d, indexer
        self.kv = torch.randn(N, C, device="cuda", generator=g)
        self.score = 2 * torch.randn(N, C, device="cuda", generator=g)
        self.ape = 0.5 * torch.randn(ratio, C, device="cuda", generator=g)
        self.kv_state = torch.randn(B, W, C, device="cuda", generator=g)
        self.score_state = torch.randn(B, W, C, device="cuda", generator=g)
        self.slot_ids = torch.randperm(B, device="cuda", generator=g)
        self.norm_weight = (0.5 + torch.rand(d, device="cuda", generator=g)).to(torch.bfloat16)
        max_pos = max(s + n for s, n in zip(starts, num_new, strict=True)) + 1
        ang = torch.arange(max_pos, device="cuda", dtype=torch.float64)[:, None] * 0.5 ** torch.arange(
            ROPE // 2, device="cuda", dtype=torch.float64)
        self.cos, self.sin = ang.cos().float(), ang.sin().float()
        rpp = 32 if ratio == 4 else 1  # a page holds 128 tokens: 32 CSA rows, 1 HCA row
        pages_each = max(s + n for s, n in zip(starts, num_new, strict=True)) // 128 + 1
        if capacity is None:  # prefill: distinct pages
            num_pages = B * pages_each
            self.page_table = torch.randperm(num_pages, device="cuda", generator=g).to(torch.int32).view(B, -1)
        else:  # decode commits at most one entry a request: one page per request holds it
            num_pages = B
            self.page_table = torch.arange(B, device="cuda", dtype=torch.int32)[:, None].expand(B, pages_each)
            self.page_table = self.page_table.contiguous()
        if cache is not None:
            self.cache = cache
        elif indexer:
            self.cache = torch.zeros(num_pages, rpp, 144, dtype=torch.uint8, device="cuda")
        else:
            self.cache = torch.zeros(num_pages, rpp, ROWS.row_bytes, dtype=torch.uint8, device="cuda")
        self.plan = build_compress_plan(starts, num_new, ratio, overlap, device="cuda", capacity=capacity,
                                        write_capacity=capacity)
        self.num_entries = self.plan.commit.num_rows
        self.window_rows = self.num_entries * W
        self.write_rows = self.plan.write.num_rows

    def args(self):
        return (self.kv, self.score, self.ape, self.kv_state, self.score_state, self.slot_ids, self.plan,
                self.norm_weight, self.cos, self.sin)

    def compress(self, config=None, backend="triton"):
        fn = compress_indexer if self.indexer else compress_main
        rows = {} if self.indexer else dict(row_layout=ROWS)
        fn(*self.args(), self.cache, self.page_table, eps=1e-6, act_dtype=torch.bfloat16, backend=backend,
           config=config, **rows)

    def compress_ref(self):
        fn = compress_indexer_ref if self.indexer else compress_main_ref
        rows = {} if self.indexer else dict(row_layout=ROWS)
        fn(*self.args(), self.cache, self.page_table, eps=1e-6, act_dtype=torch.bfloat16, **rows)

    def state_write(self):
        compressor_state_write(self.kv, self.score, self.ape, self.kv_state, self.score_state, self.slot_ids,
                               self.plan)

    def state_write_ref(self):
        compressor_state_write_ref(self.kv, self.score, self.ape, self.kv_state, self.score_state, self.slot_ids,
                                   self.plan)

    def compress_bytes(self) -> int:
        out_row = 144 if self.indexer else ROWS.row_bytes
        return self.window_rows * self.d * 8 + self.num_entries * out_row

    def compress_flops(self) -> int:
        return 2 * 128 * 128 * self.num_entries if self.indexer else 0

    def state_bytes(self) -> int:
        return self.write_rows * self.kv.shape[1] * 4 * 2 * 2

    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.kv, self.score, self.kv_state, self.score_state))


def check(inp: Inputs, config) -> float:
    """Relative error of the kernel's cache rows vs the reference's (both from the same inputs)."""
    inp.cache.fill_(0)
    inp.compress(config)
    got = inp.cache.clone()
    inp.cache.fill_(0)
    inp.compress_ref()
    want = inp.cache.clone()
    if inp.indexer:
        def deq(c):
            flat = c.view(-1, 144)
            return flat[:, :128].contiguous().view(torch.float8_e4m3fn).float() * flat[:, 128:132].contiguous().view(
                torch.float32)
        got, want = deq(got), deq(want)
    else:
        got, want = unpack_kv_rows(got, ROWS), unpack_kv_rows(want, ROWS)
    got, want = got.float(), want.float()
    assert not got.isnan().any()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    decode_starts = torch.randint(4096, 65536, (128,), generator=g).tolist()
    return {
        "prefill 8×4096": ([0] * 8, [4096] * 8, None),
        "decode 128": (decode_starts, [1] * 128, 128),
    }


def floor_us(num_bytes, flops, bw, rate):
    return max(num_bytes / bw, flops / rate) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="time every config of SWEEP, not just the default")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    bw, rate = copy_bandwidth(), matmul_rate()
    head = (f"device: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
            f"triton {triton.__version__}\ncopy {bw / 1e12:.2f} TB/s (read + write), bf16 matmul {rate / 1e12:.0f} "
            f"TFLOP/s")
    print(head, flush=True)
    rows, sweep_rows = [], []
    for bname, (starts, num_new, cap) in batches().items():
        for kind in KINDS:
            t0 = time.time()
            inp = Inputs(kind, starts, num_new, cap, seed=1)
            ratio, overlap, d, indexer = KINDS[kind]
            nsets = max(1, min(32, -(-2 * L2_BYTES // inp.size_bytes())))  # rotate through ≥ 2× the L2
            sets = [inp] + [Inputs(kind, starts, num_new, cap, seed=2 + i, cache=inp.cache) for i in range(nsets - 1)]
            configs = SWEEP[kind] if args.sweep else []
            default = default_config(d, (2 if overlap else 1) * ratio, indexer)
            if not indexer:  # as the wrapper picks it: HCA decode splits the window across programs
                splits = window_splits(ratio, inp.plan.commit.rows.shape[0], props.multi_processor_count)
                default = dataclasses.replace(default, window_splits=splits)
            if default.window_splits > 1:  # and the one-program window, timed in the same run
                configs = [dataclasses.replace(default, window_splits=1)] + configs
            results = {}
            for cfg in [default] + [c for c in configs if c != default]:
                try:
                    err = check(inp, cfg)
                    us = graph_us(sets, lambda s, c=cfg: s.compress(c))
                except Exception as exc:  # a config that fails to compile or run is reported, not fatal
                    print(f"  {kind} {bname} {cfg}: FAILED {type(exc).__name__}: {exc}", flush=True)
                    continue
                results[cfg] = (us, err)
                fl = floor_us(inp.compress_bytes(), inp.compress_flops(), bw, rate)
                sweep_rows.append(f"| {bname} | {kind} | {cfg.block_m}/{cfg.block_w}/{cfg.num_warps}"
                                  f"/s{cfg.window_splits} | {us:.1f} | "
                                  f"{fl:.1f} | {100 * fl / us:.0f}% | {err:.1e} |")
                print(sweep_rows[-1], flush=True)
            us, err = results[default]
            assert err < 2e-2, f"{kind} {bname}: kernel vs reference error {err}"
            ref_us = bench_us(inp.compress_ref)
            launches = kernel_launches(inp.compress)
            ref_launches = kernel_launches(inp.compress_ref)
            fl = floor_us(inp.compress_bytes(), inp.compress_flops(), bw, rate)
            st_us = graph_us(sets, Inputs.state_write)
            st_fl = floor_us(inp.state_bytes(), 0, bw, rate)
            st_ref = bench_us(inp.state_write_ref)
            st_launch = kernel_launches(inp.state_write)
            rows.append((bname, kind, sum(num_new), inp.num_entries, us, fl, ref_us, launches, ref_launches,
                         inp.write_rows, st_us, st_fl, st_ref, st_launch, default))
            print(f"  {bname} {kind}: {us:.1f} µs (floor {fl:.1f}), ref {ref_us:.0f} µs, launches {launches}; "
                  f"state write {st_us:.1f} µs (floor {st_fl:.1f}) [{time.time() - t0:.0f} s]", flush=True)
            del inp, sets
            torch.cuda.empty_cache()
        # the SWA ring write of one layer: each request's last `window` scratch rows, 584-byte FP8 KV rows
        N = sum(num_new)
        B = len(starts)
        kv = pack_kv_rows(torch.randn(N, D_MAIN, device="cuda", dtype=torch.bfloat16), ROWS)
        rings = [torch.zeros(B, WINDOW, ROWS.row_bytes, device="cuda", dtype=torch.uint8) for _ in range(8)]
        slot_ids = torch.arange(B, device="cuda")
        plan = build_write_plan(starts, num_new, WINDOW, device="cuda", capacity=cap)
        calls = [lambda r=r, a=(kv, slot_ids, plan): swa_ring_write(a[0], r, a[1], a[2]) for r in rings]
        swa_us = graph_us_per_call(calls)
        swa_fl = floor_us(plan.num_rows * ROWS.row_bytes * 2, 0, bw, rate)
        rows.append((bname, "SWA ring write", N, plan.num_rows, swa_us, swa_fl, None, kernel_launches(calls[0]),
                     None, None, None, None, None, None, None))
        print(f"  {bname} SWA write: {swa_us:.1f} µs (floor {swa_fl:.2f})", flush=True)

    lines = [head, "", "| batch | compressor | tokens | entries | time µs | floor µs | % of floor | reference µs | "
             "× reference | launches (ref) | ring rows | state write µs | floor µs | % | × ref | launches | "
             "config m/w/warps/splits |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for (bname, kind, n, e, us, fl, ref_us, la, rla, wr, st_us, st_fl, st_ref, st_la, cfg) in rows:
        if ref_us is None:
            lines.append(f"| {bname} | {kind} | {n} | {e} rows | {us:.1f} | {fl:.2f} | {100 * fl / us:.0f}% | | | {la} "
                         f"| | | | | | | |")
            continue
        lines.append(f"| {bname} | {kind} | {n} | {e} | {us:.1f} | {fl:.2f} | {100 * fl / us:.0f}% | {ref_us:.0f} | "
                     f"{ref_us / us:.0f}× | {la} ({rla}) | {wr} | {st_us:.1f} | {st_fl:.2f} | "
                     f"{100 * st_fl / st_us:.0f}% | {st_ref / st_us:.0f}× | {st_la} | "
                     f"{cfg.block_m}/{cfg.block_w}/{cfg.num_warps}/s{cfg.window_splits} |")
    if sweep_rows:
        lines += ["", "| batch | compressor | config m/w/warps/splits | time µs | floor µs | % of floor "
                  "| rel. err vs ref |",
                  "|---|---|---|---:|---:|---:|---:|", *sweep_rows]
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
