"""Engine benchmark on one GPU (`bench` preset): decode tokens/s at several batch sizes with 4K-token
contexts, prefill tokens/s at 8K, each decode step split into metadata, model and sampling time, and the
state bytes per request next to what a dense-MLA model holds. Prints a markdown table.

    python3 -P bench/bench_engine.py [--batches 1,16,64,128] [--context 4096] [--steps 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparsepd.engine import batch as batch_module
from sparsepd.engine import scheduler as scheduler_module
from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.engine.state_io import shipped_bytes
from sparsepd.model.config import get_preset
from sparsepd.model.weights import build_model


class StepClock:
    """Wall time of build_batch (metadata) and of the scheduler's postprocess (sampling), per step."""

    def __init__(self):
        self.metadata: list[float] = []
        self.sampling: list[float] = []
        self._build = batch_module.build_batch
        self._post = scheduler_module.Scheduler._postprocess

    def install(self) -> None:
        clock = self

        def build(*a, **k):
            t = time.perf_counter()
            out = clock._build(*a, **k)
            torch.cuda.synchronize()
            clock.metadata.append(time.perf_counter() - t)
            return out

        def post(self_, *a, **k):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = clock._post(self_, *a, **k)
            clock.sampling.append(time.perf_counter() - t)
            return out

        import sparsepd.engine.runner as runner_module
        runner_module.build_batch = build
        scheduler_module.Scheduler._postprocess = post

    def reset(self) -> None:
        self.metadata.clear()
        self.sampling.clear()


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(n)]


def decode_point(model, batch: int, context: int, steps: int, clock: StepClock) -> dict:
    cfg = model.cfg
    pages = batch * (-(-(context + steps + 4) // cfg.page_size))
    engine = Engine(model, PoolConfig(num_slots=batch, max_batch_tokens=8192, num_pages=pages))
    params = SamplingParams(max_new_tokens=steps + 2, ignore_eos=True)
    reqs = [engine.submit(p, params) for p in prompts(batch, context, cfg.vocab_size, seed=batch)]
    while any(r.prefilling or not r.output_ids for r in reqs):
        engine.step()
    engine.step()  # one decode step to warm up
    clock.reset()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    step = statistics.median(times)
    meta, samp = statistics.median(clock.metadata), statistics.median(clock.sampling)
    for r in reqs:
        engine.abort(r.request_id)
    assert engine.is_idle_and_empty()
    return dict(batch=batch, step_ms=step * 1e3, tok_s=batch / step, meta_ms=meta * 1e3, sample_ms=samp * 1e3,
                model_ms=(step - meta - samp) * 1e3)


def prefill_point(model, length: int) -> dict:
    cfg = model.cfg
    engine = Engine(model, PoolConfig(num_slots=1, max_batch_tokens=length, num_pages=-(-length // cfg.page_size) + 1))
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    times = []
    for seed in range(3):
        req = engine.submit(prompts(1, length, cfg.vocab_size, seed)[0], params)
        torch.cuda.synchronize()
        t = time.perf_counter()
        while req.finish_reason is None:
            engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return dict(length=length, ms=statistics.median(times[1:]) * 1e3, tok_s=length / statistics.median(times[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", default="1,16,64,128")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prefill", type=int, default=8192)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = get_preset("bench")
    t = time.perf_counter()
    model = build_model(cfg, seed=0, device="cuda")
    print(f"# bench preset on {torch.cuda.get_device_name()}, built in {time.perf_counter() - t:.1f} s", flush=True)
    clock = StepClock()
    clock.install()
    pre = prefill_point(model, args.prefill)
    print(f"prefill {pre['length']} tokens: {pre['ms']:.1f} ms = {pre['tok_s']:.0f} tokens/s", flush=True)
    print("\n| batch | step ms | decode tokens/s | metadata ms | model ms | sampling ms | host share |")
    print("|---|---|---|---|---|---|---|")
    for b in (int(x) for x in args.batches.split(",")):
        r = decode_point(model, b, args.context, args.steps, clock)
        host = (r["meta_ms"] + r["sample_ms"]) / r["step_ms"]
        print(f"| {b} | {r['step_ms']:.2f} | {r['tok_s']:.0f} | {r['meta_ms']:.2f} | {r['model_ms']:.2f} | "
              f"{r['sample_ms']:.2f} | {host:.0%} |", flush=True)
    print("\n| preset | context | state bytes per request | dense-MLA bytes (layers·L·576·2) | ratio |")
    print("|---|---|---|---|---|")
    for name in ("bench", "v4-flash"):
        c = get_preset(name)
        for length in (4096, 32768):
            ours, mla = shipped_bytes(c, length), c.n_layers * length * 576 * 2
            print(f"| {name} | {length} | {ours:,} | {mla:,} | {ours / mla:.3f} |")


if __name__ == "__main__":
    main()
