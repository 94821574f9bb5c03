"""Engine benchmark on one GPU (`bench` preset): a decode step at several batch sizes with 4K-token contexts
against its memory floor, and an 8K-token prefill against the bf16 matmul rate, both ceilings measured in
the same run. Prints markdown tables.

Per batch: the step's wall time (engine.step(), synchronized), the GPU time of its forward alone (the
captured graph replayed back to back, or the eager forward timed with events), the floor = (bytes of the
weights the step reads once + the state rows it reads and writes) / the measured copy bandwidth, the step
over the floor, the host share (the part of the step not covered by GPU work: (wall − GPU) / wall), and the
launches a step makes (kernel and graph launches counted by the profiler).

    python3 -P bench/bench_engine.py [--batches 1,8,32,64,128,256] [--context 4096] [--steps 20] [--eager]
        [--preset bench] [--load-format auto|dummy] [--dtype auto|bf16] [--num-layers N]

`--load-format dummy` builds random weights on the GPU in the quantized layout (FP8 projections, FP4 experts) at
any preset's dimensions; `--num-layers` keeps the first N layers (what fits one GPU); the memory plan is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from sparsepd.engine.batch import RequestChunk
from sparsepd.engine.engine import Engine
from sparsepd.engine.memory_plan import memory_plan
from sparsepd.engine.pools import INDEX_ROW_BYTES, PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.engine.state_io import kv_row_bytes
from sparsepd.load_options import add_load_args, load_options_from_args, resolve_model_config
from sparsepd.model.weights import build_model
from sparsepd.model_config import ModelConfig

_LAUNCH_NAMES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write counted), median of 20."""
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(22):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return 2 * src.numel() * 4 / statistics.median(times[2:])


def matmul_rate() -> float:
    """FLOP/s of a bf16 8192³ matmul, median of 20."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    times = []
    for _ in range(22):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * 8192**3 / statistics.median(times[2:])


def weight_bytes(model, batch: int) -> tuple[int, int]:
    """(bytes of the weights a decode step of `batch` tokens reads once, expert bytes among them): every
    dense weight, the embedding rows of the batch, and per MoE layer the experts the batch is expected to
    touch, E·(1 − (1 − k/E)^batch) of E (uniform routing)."""
    cfg: ModelConfig = model.cfg
    total = experts = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if name == "embed.weight":
            total += batch * p.shape[1] * p.element_size()
        elif ".ffn.experts." in name:
            e, k = cfg.n_routed_experts, cfg.n_activated_experts
            touched = e * (1 - (1 - k / e) ** batch) / e
            experts += int(size * touched)
        elif "tid2eid" not in name:
            total += size
    return total + experts, experts


def state_bytes(cfg: ModelConfig, context: int) -> int:
    """Bytes of pool rows one request's decode token reads and writes in one step (a main KV row as the pools
    hold it: 584-byte FP8 rows on V4, head_dim · dtype bytes for float rows)."""
    row = kv_row_bytes(cfg)
    total = 0
    for ratio in cfg.compress_ratios:
        total += cfg.window * row + row  # window rows read, the new row written to the ring
        if ratio == 4:
            total += min(cfg.index_topk, context // 4) * row  # selected compressed rows
            total += context // 4 * INDEX_ROW_BYTES  # the indexer scores every visible entry
        elif ratio:
            total += context // ratio * row
    return total


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(n)]


def gpu_forward_ms(engine: Engine, work) -> float:
    """Median GPU time of the step's forward alone: graph replays (or eager forwards) back to back."""
    runner = engine.runner
    graph = None
    if runner.graphs is not None:
        chunks = [RequestChunk(r.slot, r.num_computed, t, r.pages) for r, t in work]
        runner.forward(work)  # loads this step's fields into the graph's buffers
        graph = runner.graphs.get(runner.graphs.shape_for(chunks)).graph
    times = []
    for _ in range(12):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(5):
            graph.replay() if graph is not None else runner.forward(work)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 5)
    return statistics.median(times[2:])


def launches_per_step(engine: Engine, steps: int = 3) -> float:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.key in _LAUNCH_NAMES) / steps


def top_kernels(fn, n: int, per: int = 1) -> list[tuple[str, int, float, float]]:
    """The n kernels with the most GPU time while fn runs: (name, calls, ms, share), calls and ms per `per`."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events) or 1
    return [(e.key[:70], e.count // per, e.device_time_total / 1e3 / per, e.device_time_total / total)
            for e in events[:n]]


_WAITS = ("Synchronize", "HostAlloc", "MallocHost", "Memcpy", "pin_memory", "item", "tolist", "nonzero")


def host_waits(fn, per: int = 1) -> list[tuple[str, int, float]]:
    """Host calls that can wait for the GPU or allocate pinned memory while fn runs: (name, calls, host ms), per
    `per`: where the overlap of host and GPU work is lost."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    return [(e.key[:70], e.count // per, e.cpu_time_total / 1e3 / per) for e in prof.key_averages()
            if any(w in e.key for w in _WAITS)]


def print_top(top: list) -> None:
    print("\n| kernel | calls | GPU ms | share |\n|---|---|---|---|")
    for key, count, ms, share in top:
        print(f"| {key} | {count} | {ms:.3f} | {share:.0%} |")
    print(flush=True)


def decode_point(model, batch: int, context: int, steps: int, cuda_graph: bool, bandwidth: float,
                 profile_top: int = 0) -> dict:
    cfg = model.cfg
    pages = batch * (-(-(context + 1040) // cfg.page_size))
    engine = Engine(model, PoolConfig(num_slots=batch, max_batch_tokens=8192, num_pages=pages), cuda_graph=cuda_graph,
                    overlap=cuda_graph)
    plan = memory_plan(model, engine.pools)
    params = SamplingParams(max_new_tokens=1024, ignore_eos=True)  # none finishes during the run
    reqs = [engine.submit(p, params) for p in prompts(batch, context, cfg.vocab_size, seed=batch)]
    while any(r.prefilling or not r.output_ids for r in reqs):
        engine.step()
    for _ in range(2):  # warm up (captures this shape's graph)
        engine.step()
    runs = []
    for _ in range(3):  # steady state: steps back to back (overlap hides the host), synchronized at the end
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        runs.append((time.perf_counter() - t) / steps)
    step_ms = statistics.median(runs) * 1e3
    # each request's own next input (its last token): the routed experts, and so the bytes the MoE reads, follow
    # the tokens (one token for all would route the whole batch to the same few experts: a GPU time too small)
    gpu_ms = gpu_forward_ms(engine, [(r, [r.output_ids[-1]]) for r in reqs])
    launches = launches_per_step(engine)
    top = top_kernels(lambda: [engine.step() for _ in range(3)], profile_top, per=3) if profile_top else []
    waits = host_waits(lambda: [engine.step() for _ in range(3)], per=3) if profile_top else []
    for r in reqs:
        engine.abort(r.request_id)
    assert engine.is_idle_and_empty()
    w, experts = weight_bytes(model, batch)
    floor_bytes = w + batch * state_bytes(cfg, context)
    floor_ms = floor_bytes / bandwidth * 1e3
    return dict(plan=plan, batch=batch, step_ms=step_ms, tok_s=batch / step_ms * 1e3, gpu_ms=gpu_ms,
                floor_ms=floor_ms, floor_gb=floor_bytes / 1e9, host=max(step_ms - gpu_ms, 0.0) / step_ms,
                launches=launches, top=top, waits=waits)


def prefill_flops(cfg: ModelConfig, model, length: int) -> float:
    """Matmul FLOPs of a prefill of `length` tokens: 2 · active weights · tokens + the attention products."""
    active = 0
    for name, p in model.named_parameters():
        if name == "embed.weight" or "tid2eid" in name or name.endswith(".scale"):
            continue
        values = p.numel() * (2 if p.dtype == torch.uint8 else 1)  # packed FP4: two weights a byte
        if ".ffn.experts." in name:
            active += values * cfg.n_activated_experts / cfg.n_routed_experts
        else:
            active += values
    attn = 0
    for ratio in cfg.compress_ratios:
        keys = cfg.window + (cfg.index_topk if ratio == 4 else (length // ratio // 2 if ratio else 0))
        attn += 4 * cfg.n_heads * cfg.head_dim * keys * length
        if ratio == 4:
            attn += 2 * cfg.index_n_heads * cfg.index_head_dim * (length // 4 // 2) * length
    return 2 * active * length + attn


def prefill_point(model, length: int, profile_top: int = 0) -> dict:
    cfg = model.cfg
    engine = Engine(model, PoolConfig(num_slots=1, max_batch_tokens=length, num_pages=-(-length // cfg.page_size) + 1))
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)

    def one(seed: int) -> float:
        req = engine.submit(prompts(1, length, cfg.vocab_size, seed)[0], params)
        torch.cuda.synchronize()
        t = time.perf_counter()
        while req.finish_reason is None:
            engine.step()
        torch.cuda.synchronize()
        return time.perf_counter() - t

    for seed in (100, 101):  # warm up at this exact shape: Triton compiles and autotunes outside the timing
        one(seed)
    ms = statistics.median(one(seed) for seed in range(5)) * 1e3
    top = top_kernels(lambda: one(200), profile_top) if profile_top else []
    return dict(length=length, ms=ms, tok_s=length / ms * 1e3, flops=prefill_flops(cfg, model, length), top=top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", default="1,8,32,64,128,256")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prefill", type=int, default=8192)
    ap.add_argument("--eager", action="store_true", help="also run every batch without CUDA graphs")
    ap.add_argument("--profile-prefill", type=int, default=0, metavar="N",
                    help="print the N kernels that take the most GPU time in one prefill")
    ap.add_argument("--profile-batch", type=int, default=0, metavar="B",
                    help="print the 15 kernels that take the most GPU time in a decode step at batch B")
    ap.add_argument("--preset", default="bench", help="model preset (default: bench)")
    add_load_args(ap)
    args = ap.parse_args()
    torch.manual_seed(0)
    options = load_options_from_args(args)
    cfg = resolve_model_config(args.preset, None, options)
    t = time.perf_counter()
    model = build_model(cfg, seed=0, device="cuda", load_format=options.load_format)
    bandwidth, rate = copy_bandwidth(), matmul_rate()
    print(f"# {cfg.name} ({cfg.n_layers} layers, weight_format {cfg.weight_format}) on {torch.cuda.get_device_name()}, "
          f"built in {time.perf_counter() - t:.1f} s; "
          f"copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s", flush=True)
    pre = prefill_point(model, args.prefill, args.profile_prefill)
    achieved = pre["flops"] / (pre["ms"] / 1e3)
    print(f"prefill {pre['length']} tokens: {pre['ms']:.1f} ms = {pre['tok_s']:.0f} tokens/s, "
          f"{achieved / 1e12:.0f} TFLOP/s = {achieved / rate:.0%} of the bf16 matmul rate", flush=True)
    if pre["top"]:
        print_top(pre["top"])

    print(f"\ndecode at {args.context}-token contexts\n")
    print("| mode | batch | step ms | decode tokens/s | GPU ms | floor ms (GB) | step / floor | host share | "
          "launches / step |")
    print("|---|---|---|---|---|---|---|---|---|")
    tops = []
    modes = [("graph+overlap", True)] + ([("eager", False)] if args.eager else [])
    for b in (int(x) for x in args.batches.split(",")):
        for mode, graphs in modes:
            r = decode_point(model, b, args.context, args.steps, graphs, bandwidth,
                             15 if b == args.profile_batch and graphs else 0)
            print(f"| {mode} | {b} | {r['step_ms']:.2f} | {r['tok_s']:.0f} | {r['gpu_ms']:.2f} | "
                  f"{r['floor_ms']:.2f} ({r['floor_gb']:.2f}) | {r['step_ms'] / r['floor_ms']:.1f}× | "
                  f"{r['host']:.0%} | {r['launches']:.0f} |", flush=True)
            tops.append((b, r["top"]))
            for key, count, ms in r["waits"]:
                print(f"  batch {b}: host call {key}: {count} a step, {ms:.3f} ms", flush=True)
            plan = r["plan"]
    print(f"\nmemory plan at the largest batch:\n{plan}", flush=True)
    for b, top in tops:
        if top:
            print(f"\nkernels of a decode step at batch {b} (graph replay, per step):")
            print_top(top)


if __name__ == "__main__":
    main()
