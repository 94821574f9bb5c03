#!/usr/bin/env python3
"""What a step that carries a colocated prompt costs beside a decode-only step (`bench` preset, CUDA graphs on, as a
colocated worker runs them): `--batch` requests decode at `--context` and prompts of `--prompt` tokens arrive
(`--prompts` at once). Prints the wall time (synchronized before and after) of such a step run three ways (decode
tokens and prompt chunks replayed: engine/prefill_graphs.py; decode replayed and the chunks eager; the whole step
eager) and of the prompts alone (nothing decoding), and with `--profile` the Python functions (cProfile) and torch
ops (by self CPU time) of a step whose prompts run eagerly, and the kernels it launches.

    python3 -P bench/profile_mixed.py --batch 128 --context 1024 --prompt 128 --prompts 1,4 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch

from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(engine: Engine) -> float:
    sync()
    t = time.perf_counter()
    engine.step()
    sync()
    return (time.perf_counter() - t) * 1e3


def ids(gen: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=gen).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prompt", type=int, default=128, help="tokens of each arriving prompt")
    ap.add_argument("--prompts", default="1,4", help="prompts arriving at once, comma-separated (default: 1,4)")
    ap.add_argument("--repeats", type=int, default=5, help="mixed steps timed per point")
    ap.add_argument("--profile", action="store_true", help="cProfile and torch-profile the mixed steps")
    args = ap.parse_args()
    cfg = get_preset(args.preset)
    model = build_model(cfg, seed=0, device="cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    counts = [int(c) for c in args.prompts.split(",")]
    extra = args.repeats * max(counts) * 2 + 8
    per = -(-(args.context + 1100) // cfg.page_size)
    engine = Engine(model, PoolConfig(num_slots=args.batch + extra, max_batch_tokens=8192,
                                      num_pages=(args.batch + extra) * per), cuda_graph=True, overlap=True,
                    prefill_graph=True)
    engine.capture_graphs(args.context + 1100)
    prefill_graphs = engine.runner.prefill_graphs
    decode = SamplingParams(max_new_tokens=min(1000, cfg.max_seq_len - args.context), ignore_eos=True)
    short = SamplingParams(max_new_tokens=1, ignore_eos=True)  # a prompt that ends at its first token
    reqs = [engine.submit(ids(gen, args.context, cfg.vocab_size), decode) for _ in range(args.batch)]
    while any(r.prefilling or not r.output_ids for r in reqs):
        engine.step()
    for _ in range(3):
        engine.step()
    plain = [timed(engine) for _ in range(10)]
    print(f"# {args.preset}, batch {args.batch} decoding at context {args.context}, graphs + overlap")
    print(f"decode-only step: median {statistics.median(plain):.2f} ms (min {min(plain):.2f})")
    ways = ((True, True, "decode tokens and prompts replayed"), (True, False, "decode tokens replayed, prompts eager"),
            (False, False, "the whole step eager"))
    for n in counts:
        for split, replay_prompts, how in ways:
            engine.runner.split_mixed = split
            engine.runner.prefill_graphs = prefill_graphs if replay_prompts else None
            mixed, after = [], []
            for i in range(args.repeats + 1):  # the first captures the prompt shape's graph: not counted
                for _ in range(n):
                    engine.submit(ids(gen, args.prompt, cfg.vocab_size), short)
                t = timed(engine)
                t_after = timed(engine)  # the prompts' requests finish at their first token
                timed(engine)
                if i:
                    mixed.append(t)
                    after.append(t_after)
            print(f"step with {n} prompt(s) of {args.prompt} ({how}): median {statistics.median(mixed):.2f} ms "
                  f"(min {min(mixed):.2f}); the step after: {statistics.median(after):.2f} ms")
    engine.runner.split_mixed, engine.runner.prefill_graphs = True, None  # profile the eager prompt forward
    print(f"# forwards by path: {engine.runner.forwards}")
    if args.profile:
        n = counts[-1]
        for _ in range(n):
            engine.submit(ids(gen, args.prompt, cfg.vocab_size), short)
        sync()
        prof = cProfile.Profile()
        prof.runcall(engine.step)
        sync()
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(40)
        print(out.getvalue())
        for _ in range(3):
            timed(engine)
        for _ in range(n):
            engine.submit(ids(gen, args.prompt, cfg.vocab_size), short)
        sync()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as tp:
            engine.step()
            sync()
        events = tp.key_averages()
        launches = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        print(f"# kernels on the device in the mixed step: {launches}")
        print(events.table(sort_by="self_cpu_time_total", row_limit=30))
    for r in reqs:
        engine.abort(r.request_id)
    # the prompts alone: nothing decoding
    for replay in (True, False):
        engine.runner.prefill_graphs = prefill_graphs if replay else None
        alone = []
        for i in range(args.repeats + 1):
            for _ in range(counts[-1]):
                engine.submit(ids(gen, args.prompt, cfg.vocab_size), short)
            t = timed(engine)
            timed(engine)
            if i:
                alone.append(t)
        print(f"step with only {counts[-1]} prompt(s) of {args.prompt} ({'replayed' if replay else 'eager'}): "
              f"median {statistics.median(alone):.2f} ms")


if __name__ == "__main__":
    main()
