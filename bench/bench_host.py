"""Host cost of a decode step, no GPU needed: the real scheduler, pools, page growth, prefix cache and batch
metadata builder, with the model's forward replaced by a stand-in that returns logits whose argmax is a
fixed token per request and position.

What a step does on the host is what this measures: admission, page growth (`Scheduler._grow`), scheduling,
the metadata of the step (the CUDA-graph path's numpy writer, `decode_fields_into`, for decode-only steps;
`build_batch` otherwise), drawing (here on CPU tensors: on a GPU that part runs on the device), the overlap
bookkeeping and postprocessing. The model's own arithmetic is not here.

Geometry: the `bench` preset's page size (128), window (128) and layer kinds (0, 4, 128, 4) with the `tiny`
preset's small dimensions, so the pools of 512 requests of 4K tokens fit in host memory. Contexts are
staggered (context + i·37 mod 128) so that some request crosses a page boundary at every step.

Prints host µs per step and per request-step at each batch, and calls per request-step (Python function
calls, counted with `sys.setprofile` over a few steps: a measure of work that does not depend on the
machine's load; tests/engine/test_host_cost.py asserts its growth).

    python3 -P bench/bench_host.py [--batches 1,32,128,256,512] [--context 4096] [--steps 50] [--json PATH]

With --prefill: host µs (and calls) per prompt token of chunked prefill steps, `--requests` prompts of each of
`--prompts` lengths, `--chunk` tokens a step (the eager `build_batch` path with the prefix cache's boundary
snapshots), no decode steps:

    python3 -P bench/bench_host.py --prefill [--prompts 2048,8192] [--requests 4] [--chunk 2048]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from sparsepd.engine.batch import BatchShape, RequestChunk, build_batch, check_chunks, decode_fields_into, host_fields
from sparsepd.engine.engine import Engine
from sparsepd.engine.graphs import decode_shape
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.runner import Runner
from sparsepd.engine.sampling import SamplingParams
from sparsepd.model.weights import build_model
from sparsepd.model_config import ModelConfig, get_preset


class StandInRunner(Runner):
    """A Runner whose forward builds the step's metadata as the real one does and returns logits whose argmax
    is (slot · 31 + position) mod vocab, without running the model."""

    def __init__(self, model, pools, max_batch: int):
        super().__init__(model, pools, cuda_graph=False)
        vocab = model.cfg.vocab_size
        self._logits = torch.zeros(max_batch, vocab)
        self._views: dict[BatchShape, dict] = {}
        self._buckets = tuple(2 ** i for i in range(_bucket(max_batch).bit_length()))

    def _forward(self, work, final_rows=None, logit_rows=None):
        chunks = [RequestChunk(r.slot, r.num_computed, tokens, r.pages) for r, tokens in work]
        check_chunks(chunks, self.pools.geometry, self.model.cfg.vocab_size)
        g = self.pools.geometry
        shape = decode_shape(chunks, self._buckets, g.num_pages)  # as engine/graphs.py's DecodeGraphs.shape_for
        if shape is not None:  # what the graph path writes before a replay
            views = self._views.get(shape)
            if views is None:
                views = self._views[shape] = {k: v.numpy().copy() for k, v in host_fields([], g, shape).items()}
            decode_fields_into(chunks, g, shape, views)
        else:
            build_batch(chunks, g, self.pools.device)
        vocab = self.model.cfg.vocab_size
        logits = self._logits[: len(chunks)]
        logits.zero_()
        targets = torch.tensor([(c.slot * 31 + c.start + len(c.token_ids)) % vocab for c in chunks])
        logits[torch.arange(len(chunks)), targets] = 1.0
        return logits


def _bucket(n: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return b


def host_config() -> ModelConfig:
    """`tiny`'s dimensions in the `bench` preset's page geometry (page 128, window 128, ratios 0/4/128/4)."""
    tiny = get_preset("tiny")
    return tiny.model_copy(update={"page_size": 128, "window": 128, "n_layers": 4, "compress_ratios": (0, 4, 128, 4),
                                   "max_seq_len": 16384, "original_seq_len": 16384, "rope_factor": 1.0})


@dataclass
class HostFigures:
    batch: int
    step_us: float  # median host µs of a decode step
    per_request_us: float  # step_us / batch
    calls_per_request_step: float  # Python calls per request per step (sys.setprofile)
    retractions: int


PREFILL_TOKENS = 16384  # a step's prefill budget: the prompts go through in few steps


def make_engine(batch: int, context: int, steps: int, overlap: bool = True, cache_entries: int = 8,
                batch_tokens: int | None = None) -> Engine:
    """An engine whose pools hold `batch` requests of `context` + `steps` tokens (and a few spare pages); a step
    computes at most `batch_tokens` tokens (default PREFILL_TOKENS + batch)."""
    cfg = host_config()
    model = build_model(cfg, seed=0, device="cpu")
    page = cfg.page_size
    pages_each = -(-(context + page + steps) // page) + 1
    pool = PoolConfig(num_slots=batch, max_batch_tokens=batch_tokens or PREFILL_TOKENS + batch,
                      num_pages=batch * pages_each + 16, prefix_cache_entries=cache_entries)
    engine = Engine(model, pool, overlap=overlap)
    engine.runner = StandInRunner(model, engine.pools, PREFILL_TOKENS + batch)
    engine.scheduler.runner = engine.runner
    return engine


def start_decoding(engine: Engine, batch: int, context: int, max_new: int) -> None:
    """Submit `batch` requests with staggered contexts and run until every one of them is decoding. Prompt
    tokens are seeded per request; the prefill goes through the stand-in like any step."""
    vocab = engine.model.cfg.vocab_size
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True, temperature=0.0)
    g = torch.Generator().manual_seed(batch)
    for i in range(batch):
        n = context + (i * 37) % engine.model.cfg.page_size
        prompt = torch.randint(0, vocab - 8, (n,), generator=g).tolist()
        engine.submit(prompt, params)
    sched = engine.scheduler
    while sched.waiting or any(r.prefilling for r in sched.running):
        engine.step()


def count_calls(fn) -> int:
    """Python function calls (and C calls) made while fn runs."""
    calls = 0

    def hook(frame, event, arg):
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(hook)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def engine_page(context: int) -> int:
    return host_config().page_size


def measure(batch: int, context: int, steps: int, count_steps: int = 3) -> HostFigures:
    # the first requests decode while the later ones prefill: room for those tokens too
    prefill_steps = batch * (context + engine_page(context)) // PREFILL_TOKENS + 4
    total = prefill_steps + steps + count_steps + 8
    engine = make_engine(batch, context, total)
    start_decoding(engine, batch, context, max_new=total)
    for _ in range(2):  # warm-up: first decode steps (overlap pipeline filled)
        engine.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    calls = count_calls(lambda: [engine.step() for _ in range(count_steps)])
    running = len(engine.scheduler.running)
    if running != batch:
        raise RuntimeError(f"{running} of {batch} requests still running after the timed steps")
    step_us = statistics.median(times) * 1e6
    return HostFigures(batch, step_us, step_us / batch, calls / (count_steps * batch), engine.scheduler.retractions)


@dataclass
class PrefillFigures:
    prompt: int  # tokens per prompt
    requests: int
    chunk: int  # a step's token budget
    steps: int  # steps until every request decodes
    token_us: float  # median host µs per prompt token (the steps' time ÷ the prompt tokens)
    calls_per_token: float  # Python calls per prompt token (sys.setprofile)


def measure_prefill(prompt: int, requests: int = 4, chunk: int = 2048, repeats: int = 3) -> PrefillFigures:
    """Chunked prefill: `requests` prompts of `prompt` tokens (distinct: no prefix-cache hit, but the cache
    snapshots their page boundaries) submitted at once and stepped until every one decodes, `chunk` tokens a
    step; timed `repeats` times on fresh engines, then counted once."""
    def run(counted: bool) -> tuple[float, int, int]:
        engine = make_engine(requests, prompt, 8, batch_tokens=chunk)
        vocab = engine.model.cfg.vocab_size
        params = SamplingParams(max_new_tokens=4, ignore_eos=True, temperature=0.0)
        g = torch.Generator().manual_seed(prompt)
        for _ in range(requests):
            engine.submit(torch.randint(0, vocab - 8, (prompt,), generator=g).tolist(), params)
        sched, elapsed, steps, calls = engine.scheduler, 0.0, 0, 0
        while sched.waiting or any(r.prefilling for r in sched.running):
            if counted:
                calls += count_calls(engine.step)
            else:
                t0 = time.perf_counter()
                engine.step()
                elapsed += time.perf_counter() - t0
            steps += 1
        return elapsed, steps, calls

    times = [run(False)[0] for _ in range(repeats)]
    _, steps, calls = run(True)
    tokens = prompt * requests
    return PrefillFigures(prompt, requests, chunk, steps, statistics.median(times) * 1e6 / tokens, calls / tokens)


def main_prefill(args) -> int:
    rows = []
    print("| prompt tokens | requests | chunk | steps | host µs / prompt token | calls / prompt token |")
    print("|---|---|---|---|---|---|")
    for prompt in (int(x) for x in args.prompts.split(",")):
        f = measure_prefill(prompt, args.requests, args.chunk)
        rows.append(f)
        print(f"| {f.prompt} | {f.requests} | {f.chunk} | {f.steps} | {f.token_us:.2f} | {f.calls_per_token:.2f} |",
              flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([f.__dict__ for f in rows], fh, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,32,128,256,512")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=50, help="timed decode steps per batch (median reported)")
    ap.add_argument("--json", default=None, help="also write the figures as JSON here")
    ap.add_argument("--prefill", action="store_true", help="measure chunked prefill instead (host µs per prompt token)")
    ap.add_argument("--prompts", default="2048,8192", help="--prefill: prompt lengths")
    ap.add_argument("--requests", type=int, default=4, help="--prefill: prompts submitted at once")
    ap.add_argument("--chunk", type=int, default=2048, help="--prefill: a step's token budget")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.prefill:
        return main_prefill(args)
    rows = []
    print("| batch | host µs / step | µs / request-step | calls / request-step | retractions |")
    print("|---|---|---|---|---|")
    for b in (int(x) for x in args.batches.split(",")):
        f = measure(b, args.context, args.steps)
        rows.append(f)
        print(f"| {f.batch} | {f.step_us:,.0f} | {f.per_request_us:,.1f} | {f.calls_per_request_step:,.0f} | "
              f"{f.retractions} |", flush=True)
    by_batch = {f.batch: f for f in rows}
    if 32 in by_batch and 512 in by_batch:
        r = by_batch[512].per_request_us / by_batch[32].per_request_us
        print(f"\nµs per request-step at 512 ÷ at 32: {r:.2f} (target ≤ 1.5)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([f.__dict__ for f in rows], fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
