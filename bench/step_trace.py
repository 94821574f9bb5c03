"""Where a decode step's time goes (`bench` preset, CUDA graphs and overlap, 4K contexts), per batch:

1. the host's phases of `engine.step()` (the scheduler's schedule, forward, draw and postprocess, the wait for the
   tokens, the static fields' fill, the graph launch), timed with perf_counter wrappers over 30 steps, no profiler;
2. six steps under torch's profiler (CPU and CUDA; after two it sees unrecorded: its start-up stalls them),
   written as a gzipped chrome trace (`--out`), and from it the GPU's busy and idle time a step, the largest gaps
   between GPU operations (what ran next) and the GPU operations by total time: the kernels outside the graph and
   the graph's own.

    python3 -P bench/step_trace.py [--batches 64,128,256] [--context 4096] [--out DIR] [--device cuda]

The engine benchmark's "host share" is (step − replay) / step; this says which part of the step that is. On the CPU
(`--device cpu`, a small preset) only the host phases are printed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from sparsepd.engine import draw as draw_mod
from sparsepd.engine import graphs as graphs_mod
from sparsepd.engine import runner as runner_mod
from sparsepd.engine import scheduler as sched_mod
from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.load_options import add_load_args, load_options_from_args, resolve_model_config
from sparsepd.model.weights import build_model

PHASES = ((sched_mod.Scheduler, "_schedule"), (sched_mod.Scheduler, "_forward"), (sched_mod.Scheduler, "_draw"),
          (sched_mod.Scheduler, "_postprocess"), (sched_mod.Scheduler, "_read_in_flight"),
          (draw_mod.HostDraw, "result"), (graphs_mod.StaticFields, "fill"), (torch.cuda.CUDAGraph, "replay"),
          (runner_mod.Runner, "remember_tokens"), (draw_mod.Drawn, "to_host"), (sched_mod, "plain_draw"))


def time_phases(acc: dict[str, float]) -> None:
    """Wrap each phase so that its host seconds add up in acc[name] (for the rest of this process)."""
    for obj, name in PHASES:
        f, key = getattr(obj, name), f"{getattr(obj, '__name__', obj)}.{name}"

        def timed(*a, _f=f, _key=key, **k):
            t = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                acc[_key] += time.perf_counter() - t
        setattr(obj, name, timed)


def gpu_summary(trace: dict, steps: int) -> None:
    """GPU busy and idle a step, the largest gaps between GPU operations, the operations by total time."""
    ev = sorted((e for e in trace["traceEvents"] if e.get("ph") == "X"
                 and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    if not ev:
        return
    busy, end, gaps = 0.0, None, []
    for e in ev:
        start, dur = e["ts"], e["dur"]
        if end is not None and start > end:
            gaps.append((start - end, e["name"][:60]))
        busy += dur if end is None or start >= end else max(0.0, start + dur - end)
        end = start + dur if end is None else max(end, start + dur)
    span = end - ev[0]["ts"]
    print(f"  profiled: GPU span {span / steps:.1f} µs a step, busy {busy / steps:.1f}, "
          f"idle {(span - busy) / steps:.1f}")
    for gap, name in sorted(gaps, reverse=True)[:15]:
        print(f"    gap {gap:7.1f} µs before {name}")
    ops = defaultdict(lambda: [0, 0.0])
    for e in ev:
        ops[e["name"][:60]][0] += 1
        ops[e["name"][:60]][1] += e["dur"]
    print("  GPU operations by total time (a step):")
    for name, (count, dur) in sorted(ops.items(), key=lambda kv: -kv[1][1])[:25]:
        print(f"    {dur / steps:8.1f} µs  {count / steps:6.1f}×  {name}")


def one_batch(model, cfg, b: int, args, acc: dict[str, float]) -> None:
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    pages = b * (-(-(args.context + 1040) // cfg.page_size))
    engine = Engine(model, PoolConfig(num_slots=b, max_batch_tokens=8192, num_pages=pages), cuda_graph=cuda,
                    overlap=True)
    params = SamplingParams(max_new_tokens=min(1024, cfg.max_seq_len - args.context), ignore_eos=True)
    gen = torch.Generator().manual_seed(b)
    reqs = [engine.submit(torch.randint(0, cfg.vocab_size, (args.context,), generator=gen).tolist(), params)
            for _ in range(b)]
    while any(r.prefilling or not r.output_ids for r in reqs):
        engine.step()
    for _ in range(3):  # warm up: this shape's graph captured, the overlap pipeline full
        engine.step()
    sync()
    acc.clear()
    steps, calls = 30, []
    t0 = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        calls.append(time.perf_counter() - t)
    sync()
    wall = (time.perf_counter() - t0) / steps
    print(f"\n## batch {b}: step {wall * 1e3:.3f} ms; engine.step() call median "
          f"{statistics.median(calls) * 1e3:.3f} ms")
    for key, seconds in sorted(acc.items(), key=lambda kv: -kv[1]):
        print(f"  {key:32s} {seconds / steps * 1e3:8.3f} ms a step")
    if cuda:
        # the profiler's own start-up stalls the first steps it sees (~1 ms of GPU gaps at batch 128): two steps
        # under it unrecorded, then six recorded
        path = os.path.join(args.out, f"trace_b{b}.json")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                     schedule=schedule(wait=1, warmup=1, active=6),
                     on_trace_ready=lambda p: p.export_chrome_trace(path)) as prof:
            for i in range(8):
                engine.step()
                if i == 7:
                    sync()
                prof.step()
        with open(path) as f:
            trace = json.load(f)
        os.remove(path)
        with gzip.open(path + ".gz", "wt") as g:
            json.dump(trace, g)
        gpu_summary(trace, 6)
    for r in reqs:
        engine.abort(r.request_id)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="64,128,256")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--out", default="trace-out", help="folder for the gzipped chrome traces (made if missing)")
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--device", default="cuda")
    add_load_args(ap)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    options = load_options_from_args(args)
    cfg = resolve_model_config(args.preset, None, options)
    model = build_model(cfg, seed=0, device=args.device, load_format=options.load_format)
    acc: dict[str, float] = defaultdict(float)
    time_phases(acc)
    for b in (int(x) for x in args.batches.split(",")):
        one_batch(model, cfg, b, args, acc)
        if args.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
