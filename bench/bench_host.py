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

With --spec K: host µs and calls per speculative step (engine/speculative.py) and per delivered token, K drafts a
request from the oracle drafter (engine/drafter.py `OracleDrafter`) kept with probability `--accept`. The stand-in
model's next token is a function of the row's token and position, and the oracle's references follow it, so a kept
draft is accepted. The verification runs the fixed-shape step of engine/spec_graphs.py (its metadata writer, the
pending tokens, the logit and stream rows), the undo log saves and restores the rejected positions' rows in the
real pools (engine/undo_graphs.py: its fixed-shape bodies run eagerly here and, as one graph replay each on a GPU,
count neither their Python calls nor their torch ops), and acceptance, delivery and drafting run as in serving; the
default context is the GPU benchmark's 1024 (bench/bench_spec.py):

    python3 -P bench/bench_host.py --spec 3 [--accept 0,0.8] [--batches 1,8,64] [--context 1024]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparsepd.engine.batch import BatchShape, RequestChunk, build_batch, check_chunks, decode_fields_into, host_fields
from sparsepd.engine.drafter import OracleDrafter
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


class StandInModel:
    """The model's `forward_batch` without its arithmetic: row t's logits are one-hot at
    `next_token(token_ids[t], positions[t])` and its last-block stream is zeros. Everything else a step does (the
    runner, the verification's fixed-shape step, the undo log over the real pools) runs as it does in serving."""

    def __init__(self, cfg: ModelConfig, max_rows: int):
        self.cfg, self.device = cfg, torch.device("cpu")
        self._logits = torch.zeros(max_rows, cfg.vocab_size)  # [T, V]
        self._hidden = torch.zeros(max_rows, cfg.hc_mult, cfg.dim)  # [T, hc, dim]

    def forward_batch(self, token_ids, positions, cache, logit_rows=None, ids_checked=False, final_rows=None):
        rows = token_ids.shape[0]
        logits = self._logits[:rows]
        logits.zero_()
        logits.scatter_(1, next_token(token_ids, positions, self.cfg.vocab_size)[:, None], 1.0)
        if logit_rows is not None:
            logits = logits[logit_rows]
        return logits if final_rows is None else (logits, self._hidden[:rows][final_rows])


def next_token(token, position, vocab_size: int):
    """The stand-in model's greedy token after `token` at `position` (ints or tensors), never a special token."""
    return (token * 31 + position * 7 + 1) % (vocab_size - 8)


def references(prompt: list[int], num_tokens: int, vocab_size: int) -> list[int]:
    """The stand-in model's greedy continuation of `prompt` (what the oracle drafts)."""
    out, token = [], prompt[-1]
    for position in range(len(prompt) - 1, len(prompt) - 1 + num_tokens):
        token = next_token(token, position, vocab_size)
        out.append(token)
    return out


def make_spec_engine(batch: int, context: int, steps: int, k: int, accept: float) -> Engine:
    """A speculative engine (k drafts, the verification's fixed-shape steps run eagerly, as on the CPU with graphs)
    over the stand-in model, its pools sized as `make_engine`'s for `steps` × (k + 1) tokens a request; an oracle
    drafter whose references `start_spec` fills."""
    cfg = host_config()
    model = build_model(cfg, seed=0, device="cpu")
    page = cfg.page_size
    pages_each = -(-(context + page + steps * (k + 1)) // page) + 1
    pool = PoolConfig(num_slots=batch, max_batch_tokens=PREFILL_TOKENS + batch * (k + 1),
                      num_pages=batch * pages_each + 16, prefix_cache_entries=8)
    drafter = OracleDrafter({}, accept, cfg.vocab_size, seed=batch)
    engine = Engine(model, pool, cuda_graph=True, graph_capture=False, speculative_num_steps=k, drafter=drafter)
    engine.runner = Runner(StandInModel(cfg, pool.max_batch_tokens), engine.pools)
    engine.runner.use_verify_graphs(k, capture=False)
    engine.scheduler.runner = engine.runner
    return engine


def start_spec(engine: Engine, batch: int, context: int, max_new: int) -> None:
    """`start_decoding` for a speculative engine: the oracle's references are the stand-in model's continuations."""
    vocab = engine.model.cfg.vocab_size
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True, temperature=0.0)
    g = torch.Generator().manual_seed(batch)
    refs = engine.scheduler.drafter.references
    for i in range(batch):
        n = context + (i * 37) % engine.model.cfg.page_size
        prompt = torch.randint(0, vocab - 8, (n,), generator=g).tolist()
        refs[engine.submit(prompt, params).request_id] = references(prompt, max_new, vocab)
    sched = engine.scheduler
    while sched.waiting or any(r.prefilling for r in sched.running):
        engine.step()


class OpCounter(TorchDispatchMode):
    """Counts the torch operators a step dispatches (on a GPU each is a kernel launch or a view, host work either
    way), except while `paused` (the stand-in verification: on a GPU one graph replay)."""

    def __init__(self):
        super().__init__()
        self.ops, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not self.paused
        return func(*args, **(kwargs or {}))


@dataclass
class SpecFigures:
    batch: int
    k: int
    accept: float
    tokens_per_request_step: float  # tokens delivered per request per step (1 … k + 1)
    step_us: float  # median host µs of a speculative step
    token_us: float  # step_us / tokens delivered by the step
    calls_per_step: float  # Python calls per step (sys.setprofile)
    calls_per_token: float  # … per token delivered
    ops_per_step: float  # torch operators per step outside the verification forward (`OpCounter`)


def measure_spec(batch: int, k: int, accept: float, context: int = 1024, steps: int = 30,
                 count_steps: int = 3) -> SpecFigures:
    # the first requests decode while the later ones prefill: room for those tokens too
    total = batch * (context + engine_page(context)) // PREFILL_TOKENS + steps + 2 * count_steps + 8
    engine = make_spec_engine(batch, context, total, k, accept)
    counter, steps_of = OpCounter(), engine.runner.verify_graphs.steps
    body = steps_of.body

    def stand_in(batch, inputs):  # (the fixed-shape steps are built with this body: on a GPU, a replay)
        counter.paused = True
        try:
            return body(batch, inputs)
        finally:
            counter.paused = False

    steps_of.body = stand_in
    undo, run_undo = engine.scheduler._undo_graphs, engine.scheduler._undo_graphs._run

    def replay(step, which):  # the undo log's fixed-shape bodies: on a GPU one graph replay each, counted as one
        hook, counter.paused = sys.getprofile(), True
        sys.setprofile(None)
        try:
            run_undo(step, which)
        finally:
            sys.setprofile(hook)
            counter.paused = False

    undo._run = replay
    start_spec(engine, batch, context, max_new=total * (k + 1))
    for _ in range(2):  # warm-up: the first verifications (their fixed-shape steps built)
        engine.step()
    requests = list(engine.scheduler.running)

    def delivered() -> int:
        return sum(len(r.output_ids) for r in requests)

    times, first = [], delivered()
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    tokens = (delivered() - first) / steps
    calls = count_calls(lambda: [engine.step() for _ in range(count_steps)]) / count_steps
    with counter:
        for _ in range(count_steps):
            engine.step()
    if len(engine.scheduler.running) != batch:
        raise RuntimeError(f"{len(engine.scheduler.running)} of {batch} requests still running after the timed steps")
    refs = engine.scheduler.drafter.references
    if any(r.output_ids != refs[r.request_id][: len(r.output_ids)] for r in requests):
        raise RuntimeError("the speculative steps delivered other tokens than the stand-in model's greedy ones")
    if engine.runner.verify_graphs.steps.runs < steps:
        raise RuntimeError("the verifications did not take the fixed-shape path")
    step_us = statistics.median(times) * 1e6
    return SpecFigures(batch, k, accept, tokens / batch, step_us, step_us / tokens, calls, calls / tokens,
                       counter.ops / count_steps)


def main_spec(args) -> int:
    rows = []
    print(f"k = {args.spec}, context {args.context}")
    print("| batch | accept | tokens / request-step | host µs / step | µs / token | calls / step | calls / token | "
          "torch ops / step |")
    print("|---|---|---|---|---|---|---|---|")
    for accept in (float(x) for x in args.accept.split(",")):
        for b in (int(x) for x in args.batches.split(",")):
            f = measure_spec(b, args.spec, accept, args.context, args.steps)
            rows.append(f)
            print(f"| {f.batch} | {f.accept} | {f.tokens_per_request_step:.2f} | {f.step_us:,.0f} | "
                  f"{f.token_us:,.1f} | {f.calls_per_step:,.0f} | {f.calls_per_token:,.1f} | {f.ops_per_step:,.0f} |",
                  flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([f.__dict__ for f in rows], fh, indent=1)
    return 0


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
    ap.add_argument("--batches", default=None, help="default 1,32,128,256,512 (with --spec: 1,8,64)")
    ap.add_argument("--context", type=int, default=None, help="default 4096 (with --spec: 1024)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per batch (median reported; default 50, "
                    "with --spec 30)")
    ap.add_argument("--json", default=None, help="also write the figures as JSON here")
    ap.add_argument("--prefill", action="store_true", help="measure chunked prefill instead (host µs per prompt token)")
    ap.add_argument("--prompts", default="2048,8192", help="--prefill: prompt lengths")
    ap.add_argument("--requests", type=int, default=4, help="--prefill: prompts submitted at once")
    ap.add_argument("--chunk", type=int, default=2048, help="--prefill: a step's token budget")
    ap.add_argument("--spec", type=int, default=0, help="measure speculative steps with this many drafts a request")
    ap.add_argument("--accept", default="0,0.8", help="--spec: the oracle drafts' acceptance probabilities")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.prefill:
        return main_prefill(args)
    if args.spec:
        args.batches, args.context = args.batches or "1,8,64", args.context or 1024
        args.steps = args.steps or 30
        return main_spec(args)
    args.batches, args.context = args.batches or "1,32,128,256,512", args.context or 4096
    args.steps = args.steps or 50
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
