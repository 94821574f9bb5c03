"""Benchmark of kernels/indexer.py and kernels/topk.py on the GPU: time vs the floor measured in the same run.

Shapes: Hi = 64 heads of 128 dims, 32 indexer rows a page; decode batches B ∈ {1, 32, 128} at contexts of
8K, 32K and 128K tokens (2K, 8K, 32K entries at ratio 4, every entry visible), and a prefill chunk of
T = 4096 tokens ending a 32K context (visible = (pos + 1) // 4); k ∈ {512, 1024, 2048}.

Floor of scoring + top-k = max(bytes / copy bandwidth, FLOPs / FP8 matmul rate), bytes = every visible cache
row once (144 B; the prefill's request once) + q, q_scale, weights once + the [T, E] fp32 scores written
once + the [T, k] indices; FLOPs = 2 · Hi · 128 per visible (token, entry). Floor of top-k alone = scores
read once + indices written. Top-k alone is also timed with the radix-select threshold
(`TopkConfig(radix=True)`, position order), after checking it returns the default's exact indices. The copy
bandwidth (1 GiB device-to-device copy, read + write), the bf16 matmul rate (8192³ torch.matmul) and the FP8
rate (torch._scaled_mm, if present) are measured here.

Timing: decode calls are captured in a CUDA graph that runs one call per rotated input set (distinct cache
pages, queries and outputs; enough sets to touch 2× the L2, at most 64; top-k alone rotates its own score
sets the same way), the median replay divided by the number of sets: how decode runs, and the gathers come
from DRAM (except the smallest cases, whose 64 sets fit in the L2). Prefill calls and the reference (gather +
dequantize + einsum + torch.topk, the plain PyTorch way) use triton.testing.do_bench (median; it clears the
L2 before every call).

    python3 bench/bench_indexer.py [--budget-s 300] [--sweep] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import triton

from sparsepd.kernels.indexer import ScoreConfig, indexer_cache_write, indexer_scores, quantize_rows_fp8
from sparsepd.kernels.topk import TopkConfig, topk_visible

HI, R, ROW = 64, 32, 144
KS = (512, 1024, 2048)
DECODE = [(B, ctx) for ctx in (8192, 32768, 131072) for B in (1, 32, 128)]
QUICK_DECODE = [(32, 32768), (128, 32768), (1, 32768)]  # --quick: the issue's top-k targets (B ≥ 32 at 32K), B = 1
PREFILL_T, PREFILL_CTX = 4096, 32768
SCORE_SWEEP = [ScoreConfig(64, 4, 3), ScoreConfig(64, 4, 4), ScoreConfig(128, 4, 3)]
PREFILL_SWEEP = [ScoreConfig(64, 4, 3), ScoreConfig(64, 4, 3, tokens=4), ScoreConfig(64, 8, 3, tokens=8),
                 ScoreConfig(128, 8, 3, tokens=8), ScoreConfig(64, 8, 4, tokens=8)]
TOPK_SWEEP = [TopkConfig(32), TopkConfig(64), TopkConfig(16), TopkConfig(32, radix=True), TopkConfig(64, radix=True)]
RADIX = TopkConfig(32, radix=True)  # the radix-select threshold, timed beside the default in every case


def radix_checked(scores, vis, k) -> None:
    """The radix select gives the default's exact result (or the bench stops)."""
    want = topk_visible(scores, vis, k, order="position")
    got = topk_visible(scores, vis, k, order="position", config=RADIX)
    if not torch.equal(got, want):
        raise AssertionError(f"radix top-k differs from the default at k={k}: {int((got != want).sum())} entries")


def median_ms(fn, reps=15) -> float:
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


def bench_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3


def copy_bandwidth() -> float:
    src = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * (1 << 30) / (triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3)


def matmul_rates(n=8192) -> tuple[float, float | None]:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    bf16 = 2 * n**3 / (triton.testing.do_bench(lambda: torch.matmul(a, b, out=c), return_mode="median") * 1e-3)
    try:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
        one = torch.ones((), device="cuda")
        ms = triton.testing.do_bench(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16),
                                     return_mode="median")
        return bf16, 2 * n**3 / (ms * 1e-3)
    except (RuntimeError, AttributeError, TypeError) as err:
        print(f"FP8 matmul rate unavailable ({err}); FLOP floors use the bf16 rate")
        return bf16, None


def make_pool(n_requests: int, entries: int, seed: int):
    """A cache holding n_requests · entries random keys on shuffled pages, and their page table."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    pages_per_req = entries // R
    pages = n_requests * pages_per_req
    cache = torch.empty((pages, R, ROW), dtype=torch.uint8, device="cuda")
    step = 1 << 21
    for r0 in range(0, pages * R, step):
        n = min(step, pages * R - r0)
        keys = torch.randn(n, 128, device="cuda", generator=g, dtype=torch.bfloat16)
        indexer_cache_write(cache, keys, torch.arange(r0, r0 + n, device="cuda"))
    page_table = torch.randperm(pages, device="cuda", generator=g).view(n_requests, pages_per_req).int()
    return cache, page_table


def make_queries(T: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q8, q_scale = quantize_rows_fp8(torch.randn(T, HI, 128, device="cuda", generator=g, dtype=torch.bfloat16))
    w = torch.randn(T, HI, device="cuda", generator=g) * (128**-0.5 * HI**-0.5)
    return q8, q_scale, w


def reference(q8, q_scale, w, cache, page_table, seq_ids, visible, k):
    """The plain PyTorch way: gather + dequantize the keys, einsum over all heads, relu, weight, torch.topk."""
    E = page_table.shape[1] * R
    e = torch.arange(E, device="cuda")
    rows = cache.view(-1, ROW)[page_table.long()[:, e // R] * R + e % R]  # [B, E, 144]
    keys = (rows[..., :128].view(torch.float8_e4m3fn).float() * rows[..., 128:132].contiguous().view(torch.float32)
            ).to(torch.bfloat16)  # [B, E, 128]
    q = (q8.float() * q_scale[..., None]).to(torch.bfloat16)  # [T, Hi, 128]
    if keys.shape[0] == 1:
        logits = torch.einsum("thd,ed->the", q, keys[0])
    else:
        logits = torch.einsum("thd,ted->the", q, keys[seq_ids.long()])
    scores = (logits.float().relu() * w[:, :, None]).sum(1)  # [T, E]
    scores = scores.masked_fill(e[None, :] >= visible[:, None], float("-inf"))
    return scores.topk(k, dim=1).indices


def score_error(q8, q_scale, w, cache, page_table, seq_ids, visible, n_tok=4) -> tuple[float, float]:
    """max |ours − fp64| over a few tokens, relative to Σ_h |term_h| and to Σ_h |w_h| Σ_d |q_hd k_d| (the
    magnitude the tests bound by 2e-3)."""
    sl = slice(0, n_tok)
    ours = indexer_scores(q8[sl], q_scale[sl], w[sl], cache, page_table, seq_ids[sl], visible[sl]).double()
    E = page_table.shape[1] * R
    e = torch.arange(E, device="cuda")
    worst_terms = worst_mag = 0.0
    for t in range(n_tok):
        rows = cache.view(-1, ROW)[page_table[seq_ids[t]].long()[e // R] * R + e % R]
        keys = rows[:, :128].view(torch.float8_e4m3fn).double() * rows[:, 128:132].contiguous().view(
            torch.float32).double()
        q = q8[t].double() * q_scale[t].double()[:, None]
        terms = (q @ keys.T).relu() * w[t].double()[:, None]  # [Hi, E]
        mag = ((q.abs() @ keys.abs().T) * w[t].double().abs()[:, None]).sum(0)
        n = int(visible[t])
        err = (ours[t, :n] - terms.sum(0)[:n]).abs()
        worst_terms = max(worst_terms, float((err / (terms.abs().sum(0)[:n] + 1e-30)).max()))
        worst_mag = max(worst_mag, float((err / mag[:n]).max()))
    return worst_terms, worst_mag


def decode_case(B, ctx, bw, rate, l2_bytes, sweep):
    E = ctx // 4
    per_set = B * E * ROW + B * E * 4
    n_sets = max(1, min(64, math.ceil(2 * l2_bytes / per_set)))
    cache, pt_all = make_pool(n_sets * B, E, seed=B + ctx)
    seq = torch.arange(B, device="cuda", dtype=torch.int32)
    vis = torch.full((B,), E, device="cuda", dtype=torch.int32)
    sets = []
    for i in range(n_sets):
        q8, qs, w = make_queries(B, seed=i)
        sets.append((q8, qs, w, pt_all[i * B:(i + 1) * B]))
    scores = [torch.empty((B, E), device="cuda") for _ in range(n_sets)]
    for sc, (q8, qs, w, pt) in zip(scores, sets, strict=True):
        indexer_scores(q8, qs, w, cache, pt, seq, vis, out=sc)
    t_score = graph_us_per_call([lambda s=s, sc=sc: indexer_scores(*s[:3], cache, s[3], seq, vis, out=sc)
                                 for s, sc in zip(sets, scores, strict=True)])
    sweep_rows = []
    if sweep:
        for cfg in SCORE_SWEEP:
            t = graph_us_per_call([lambda s=s, sc=sc, c=cfg: indexer_scores(*s[:3], cache, s[3], seq, vis, out=sc,
                                                                              config=c)
                                   for s, sc in zip(sets, scores, strict=True)])
            sweep_rows.append((f"scoring {cfg}", t))
    err = score_error(*sets[0][:3], cache, sets[0][3], seq, vis) if (B, ctx) == (32, 32768) else None
    n_topk_sets = max(n_sets, min(64, math.ceil(2 * l2_bytes / (B * E * 4))))  # top-k alone reads 4 B an entry
    topk_scores = [scores[i % n_sets].clone() for i in range(n_topk_sets)]
    rows = []
    for k in KS:
        outs = [torch.empty((B, k), device="cuda", dtype=torch.int32) for _ in range(n_topk_sets)]
        t_all = {}
        t_topk = {}
        for order in ("score", "position"):
            t_topk[order] = graph_us_per_call(
                [lambda sc=sc, o=o, od=order, k=k: topk_visible(sc, vis, k, order=od, out=o)
                 for sc, o in zip(topk_scores, outs, strict=True)])
            t_all[order] = graph_us_per_call(
                [lambda s=s, sc=sc, o=o, od=order, k=k: topk_visible(
                    indexer_scores(*s[:3], cache, s[3], seq, vis, out=sc), vis, k, order=od, out=o)
                 for s, sc, o in zip(sets, scores, outs, strict=False)])
        radix_checked(topk_scores[0], vis, k)
        t_topk["radix"] = graph_us_per_call(
            [lambda sc=sc, o=o, k=k: topk_visible(sc, vis, k, order="position", out=o, config=RADIX)
             for sc, o in zip(topk_scores, outs, strict=True)])
        if sweep and k == 1024:
            for cfg in TOPK_SWEEP:
                t = graph_us_per_call([lambda sc=sc, o=o, c=cfg: topk_visible(sc, vis, 1024, order="position", out=o,
                                                                               config=c)
                                       for sc, o in zip(topk_scores, outs, strict=True)])
                sweep_rows.append((f"top-k (position) {cfg}", t))
        t_ref = bench_us(lambda k=k: reference(*sets[0][:3], cache, sets[0][3], seq, vis, k))
        nbytes = B * E * ROW + B * HI * (128 + 8) + B * E * 4 + B * k * 4
        flops = 2 * B * HI * 128 * E
        floor = max(nbytes / bw, flops / rate) * 1e6
        topk_floor = (B * E * 4 + B * k * 4) / bw * 1e6
        rows.append(dict(case=f"decode B={B}", ctx=ctx, T=B, E=E, k=k, ours=t_all["score"], ours_pos=t_all["position"],
                         score=t_score, topk=t_topk["score"], topk_pos=t_topk["position"], floor=floor,
                         topk_floor=topk_floor, ref=t_ref, topk_radix=t_topk["radix"]))
    return rows, sweep_rows, err


def prefill_case(bw, rate, sweep):
    T, E = PREFILL_T, PREFILL_CTX // 4
    cache, pt = make_pool(1, E, seed=7)
    q8, qs, w = make_queries(T, seed=8)
    pos = torch.arange(PREFILL_CTX - T, PREFILL_CTX, device="cuda")
    vis = ((pos + 1) // 4).to(torch.int32)
    seq = torch.zeros(T, device="cuda", dtype=torch.int32)
    sc = torch.empty((T, E), device="cuda")
    t_score = bench_us(lambda: indexer_scores(q8, qs, w, cache, pt, seq, vis, out=sc))
    sweep_rows = []
    if sweep:
        for cfg in PREFILL_SWEEP:
            t = bench_us(lambda c=cfg: indexer_scores(q8, qs, w, cache, pt, seq, vis, out=sc, config=c))
            sweep_rows.append((f"prefill scoring {cfg}", t))
        for cfg in TOPK_SWEEP:
            out = torch.empty((T, 1024), device="cuda", dtype=torch.int32)
            t = bench_us(lambda c=cfg, out=out: topk_visible(sc, vis, 1024, order="position", out=out, config=c))
            sweep_rows.append((f"prefill top-k (position) {cfg}", t))
    rows = []
    n_vis = int(vis.long().sum())
    for k in KS:
        out = torch.empty((T, k), device="cuda", dtype=torch.int32)
        t_topk, t_all = {}, {}
        for o in ("score", "position"):
            t_topk[o] = bench_us(lambda o=o, k=k, out=out: topk_visible(sc, vis, k, order=o, out=out))
            t_all[o] = bench_us(lambda o=o, k=k, out=out: topk_visible(
                indexer_scores(q8, qs, w, cache, pt, seq, vis, out=sc), vis, k, order=o, out=out))
        radix_checked(sc, vis, k)
        t_topk["radix"] = bench_us(lambda k=k, out=out: topk_visible(sc, vis, k, order="position", out=out,
                                                                     config=RADIX))
        t_ref = bench_us(lambda k=k: reference(q8, qs, w, cache, pt, seq, vis, k))
        nbytes = E * ROW + T * HI * (128 + 8) + T * E * 4 + T * k * 4
        floor = max(nbytes / bw, 2 * HI * 128 * n_vis / rate) * 1e6
        topk_floor = (n_vis * 4 + T * k * 4) / bw * 1e6
        rows.append(dict(case="prefill", ctx=PREFILL_CTX, T=T, E=E, k=k, ours=t_all["score"],
                         ours_pos=t_all["position"], score=t_score, topk=t_topk["score"],
                         topk_pos=t_topk["position"], floor=floor, topk_floor=topk_floor, ref=t_ref,
                         topk_radix=t_topk["radix"]))
    return rows, sweep_rows


def table(rows) -> str:
    head = ("| case | context | entries | k | scoring+top-k µs (score order / position order) | floor µs | "
            "fraction of floor (score / position) | scoring alone µs | top-k alone µs (score / position) | "
            "top-k floor µs | top-k fraction (score / position) | reference µs | speedup | "
            "radix top-k µs (position) | radix fraction |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['ctx'] // 1024}K | {r['E']} | {r['k']} | {r['ours']:.1f} / {r['ours_pos']:.1f} | "
            f"{r['floor']:.1f} | {r['floor'] / r['ours']:.0%} / {r['floor'] / r['ours_pos']:.0%} | "
            f"{r['score']:.1f} | {r['topk']:.1f} / "
            f"{r['topk_pos']:.1f} | {r['topk_floor']:.1f} | {r['topk_floor'] / r['topk']:.0%} / "
            f"{r['topk_floor'] / r['topk_pos']:.0%} | {r['ref']:.0f} | {r['ref'] / r['ours']:.0f}× | "
            f"{r['topk_radix']:.1f} | {r['topk_floor'] / r['topk_radix']:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop starting new cases after this")
    parser.add_argument("--sweep", action="store_true", help="also time launch variants (32K context, prefill)")
    parser.add_argument("--out", default=None, help="also write the table here")
    parser.add_argument("--quick", action="store_true", help="decode at 32K context only (B = 32, 128, 1), no prefill")
    args = parser.parse_args()
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    bf16_rate, fp8_rate = matmul_rates()
    rate = fp8_rate or bf16_rate
    fp8_text = f"{fp8_rate / 1e12:.0f}" if fp8_rate else "n/a"
    print(f"device: {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB; "
          f"torch {torch.__version__}, triton {triton.__version__}")
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write); matmul bf16 {bf16_rate / 1e12:.0f} TFLOP/s, "
          f"fp8 {fp8_text} TFLOP/s")
    rows, sweeps = [], []
    for B, ctx in QUICK_DECODE if args.quick else DECODE:
        if time.time() - t0 > args.budget_s:
            print(f"budget spent: skipping decode B={B} ctx={ctx}")
            continue
        case_rows, sweep_rows, err = decode_case(B, ctx, bw, rate, props.L2_cache_size,
                                                 args.sweep and ctx == 32768 and B >= 32)
        rows += case_rows
        for r in case_rows:
            print(f"decode B={B} ctx={ctx} k={r['k']}: ours {r['ours']:.1f}/{r['ours_pos']:.1f} µs "
                  f"(score {r['score']:.1f}, top-k {r['topk']:.1f}/{r['topk_pos']:.1f}), floor {r['floor']:.1f}, "
                  f"top-k floor {r['topk_floor']:.1f}, reference {r['ref']:.0f} µs", flush=True)
        for name, t in sweep_rows:
            sweeps.append(f"B={B} ctx={ctx}: {name} -> {t:.1f} µs")
            print(sweeps[-1], flush=True)
        if err is not None:
            print(f"score error vs fp64 (B=32, 32K): max {err[0]:.2e} of Σ_h |term_h|, {err[1]:.2e} of "
                  f"Σ_h |w_h| Σ_d |q_hd k_d| (test bound 2e-3)")
    if time.time() - t0 <= args.budget_s and not args.quick:
        prefill_rows, sweep_rows = prefill_case(bw, rate, args.sweep)
        for name, t in sweep_rows:
            sweeps.append(f"prefill: {name} -> {t:.1f} µs")
            print(sweeps[-1], flush=True)
        for r in prefill_rows:
            rows.append(r)
            print(f"prefill k={r['k']}: ours {r['ours']:.0f}/{r['ours_pos']:.0f} µs (score {r['score']:.0f}, "
                  f"top-k {r['topk']:.0f}/{r['topk_pos']:.0f}), floor {r['floor']:.0f}, reference {r['ref']:.0f}",
                  flush=True)
    text = (f"{props.name}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {bf16_rate / 1e12:.0f} TFLOP/s, "
            f"fp8 matmul {fp8_text} TFLOP/s (FLOP floors use fp8)\n\n" + table(rows))
    if sweeps:
        text += "\n\nScoring launch variants:\n" + "\n".join(f"- {s}" for s in sweeps)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
