"""Speculative decoding (engine/speculative.py): acceptance and tokens/s against the engine without it.

`mtp` (CPU or GPU): the trained default model (sparsepd/models/v4-byte-demo) drafting with its MTP layer,
single-stream (one request at a time), greedy, for k = 0 … 3 drafted tokens a step: the acceptance rate (accepted
/ drafted), the mean tokens a step delivers, decode tokens/s (first token to last), and whether the tokens equal
those of k = 0 (they must).

`oracle` (GPU; any preset): an oracle drafter that drafts each request's true continuation with every draft token
kept with probability `accept` (0, 0.5, 0.8, 1.0), at batches 1, 8, 64: the decode step time and tokens/s per
request, timed while the whole batch decodes, against the engine without speculation (both its default path, CUDA
graphs with overlap, and its eager synchronous path): the mechanism's cost (accept 0) and its ceiling (accept 1),
with the speculative steps' CUDA graphs (engine/spec_graphs.py) off and on (`--graphs`; on the CPU "on" runs the
same fixed-shape steps eagerly, a smoke run of that path). The true continuation is a k = 0 run's tokens on the CPU
(fp32: speculation changes none); on a GPU, where a (k + 1)-row verification's bf16 numerics part from a 1-row
decode's, it is the speculative run's own tokens (`oracle_run`: repeated until it reproduces them).

    python3 -P bench/bench_spec.py mtp [--steps 0,1,2,3] [--prompts 4] [--new-tokens 128] [--repeats 2] [--device cpu]
        [--graphs]
    python3 -P bench/bench_spec.py oracle [--preset bench] [--accept 0,0.5,0.8,1.0] [--batches 1,8,64] [--k 3]
        [--graphs off,on] [--context 1024] [--new-tokens 128] [--device cuda] [--load-format auto|dummy] [--json PATH]

Prints markdown tables; `--json PATH` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from sparsepd.default_model import DEFAULT_CHECKPOINT
from sparsepd.engine.drafter import OracleDrafter
from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.load_options import LoadOptions, add_load_args, load_options_from_args, resolve_model_config
from sparsepd.model.mtp import load_mtp
from sparsepd.model.weights import build_model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_run(engine: Engine, prompts: list[list[int]], params: SamplingParams, device: str) -> dict:
    """Submit every prompt and step until each has its first token (an oracle drafter drafts nothing meanwhile, so
    the requests prefilled first decode one token a step), then time the steps while every request decodes: up to
    the first request's end, a steady batch rather than the tail of requests that started early (a batch's prompts
    are prefilled a few a step). The rest runs untimed, for the tokens."""
    drafter = getattr(engine.scheduler, "drafter", None)
    held = drafter.references if isinstance(drafter, OracleDrafter) else None
    if held is not None:
        drafter.references = {}
    requests = [engine.submit(p, params) for p in prompts]
    while any(r.prefilling or not r.output_ids for r in requests if r.finish_reason is None):
        engine.step()
    if held is not None:
        drafter.references = held
    first = [len(r.output_ids) for r in requests]
    _sync(device)
    t, steps = time.perf_counter(), 0
    while engine.has_work and all(r.finish_reason is None for r in requests):
        engine.step()
        steps += 1
    _sync(device)
    seconds = time.perf_counter() - t
    decoded = sum(len(r.output_ids) - f for r, f in zip(requests, first, strict=True))
    while engine.has_work:
        engine.step()
    assert engine.is_idle_and_empty()
    stats = getattr(engine.scheduler, "stats", None)
    return dict(outputs=[r.output_ids for r in requests], seconds=seconds, steps=steps, decoded=decoded,
                step_ms=seconds / max(steps, 1) * 1e3, tok_s_per_request=decoded / len(requests) / seconds,
                drafted=stats.drafted if stats else 0, accepted=stats.accepted if stats else 0,
                accept_lengths=list(stats.accept_lengths) if stats else [],
                tokens_per_step=decoded / len(requests) / max(steps, 1))


def oracle_run(make: Callable[[OracleDrafter], Engine], refs: dict[str, list[int]], accept: float, vocab: int,
               seed: int, prompts: list[list[int]], params: SamplingParams, device: str,
               rounds: int) -> tuple[dict, dict[str, list[int]], int, bool]:
    """A run whose oracle drafts the run's own tokens. With bf16 weights a (k + 1)-row verification's numerics part
    from a 1-row decode's, and a rejection moves the rows of a request's later verifications, so a run's tokens can
    part from the references it drafts from, and every draft after that point is wrong (the set acceptance is out
    of reach). The run is repeated with its tokens as the references until it reproduces them, at most `rounds`
    runs (the oracle's keep-or-replace draws repeat: it is seeded alike). The last run, its references, the number
    of runs and whether the last one reproduced its references."""
    for n in range(1, rounds + 1):
        run = decode_run(make(OracleDrafter(refs, accept, vocab, seed=seed)), prompts, params, device)
        outputs = {f"req-{i}": out for i, out in enumerate(run["outputs"])}
        if outputs == refs or n == rounds:
            return run, refs, n, outputs == refs
        refs = outputs
    raise ValueError(f"rounds must be ≥ 1, got {rounds}")


def mtp_mode(args: argparse.Namespace) -> list[dict]:
    cfg = resolve_model_config("tiny", str(DEFAULT_CHECKPOINT), LoadOptions())
    model = build_model(cfg, checkpoint=str(DEFAULT_CHECKPOINT), device=args.device)
    mtp = load_mtp(cfg, DEFAULT_CHECKPOINT).to(args.device)
    text = (DEFAULT_CHECKPOINT / "heldout_sample.txt").read_bytes()
    stride = max(len(text) // args.prompts, 1)
    prompts = [list(text[i * stride: i * stride + args.prompt_len]) for i in range(args.prompts)]
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    pool = PoolConfig(num_slots=1, max_batch_tokens=max(256, args.prompt_len), num_pages=64)
    steps = [int(x) for x in args.steps.split(",")]
    runs: dict[int, list[dict]] = {k: [] for k in steps}
    for p in prompts:  # single-stream: a fresh engine per prompt, one request in it; the k values interleaved and
        for _ in range(args.repeats):  # repeated (the fastest kept) so that a shared machine's load hits all alike
            for k in steps:
                engine = Engine(model, pool, speculative_num_steps=k, mtp=mtp if k else None,
                                cuda_graph=args.graphs, graph_capture=args.device.startswith("cuda"))
                if args.graphs and args.device.startswith("cuda"):
                    engine.capture_graphs(args.prompt_len + args.new_tokens + 16)
                run = decode_run(engine, [p], params, args.device)
                if len(runs[k]) > prompts.index(p):
                    if run["seconds"] < runs[k][-1]["seconds"]:
                        runs[k][-1] = run
                else:
                    runs[k].append(run)
    print(f"# {cfg.name} on {args.device}: {args.prompts} prompts of {args.prompt_len} bytes, one at a time, "
          f"{args.new_tokens} greedy tokens each, fastest of {args.repeats}")
    print("| k | acceptance | accept lengths (0…k) | tokens / step | decode tok/s | vs k=0 | tokens = k0 |")
    print("|---|---|---|---|---|---|---|")
    rows, reference = [], None
    for k in steps:
        outputs = [r["outputs"][0] for r in runs[k]]
        reference = reference if reference is not None else outputs
        drafted, accepted = sum(r["drafted"] for r in runs[k]), sum(r["accepted"] for r in runs[k])
        lengths = [sum(col) for col in zip(*[r["accept_lengths"] for r in runs[k]], strict=True)] if k else []
        tok_s = sum(r["decoded"] for r in runs[k]) / sum(r["seconds"] for r in runs[k])
        per_step = sum(r["decoded"] for r in runs[k]) / sum(r["steps"] for r in runs[k])
        row = dict(k=k, acceptance=accepted / drafted if drafted else None, accept_lengths=lengths,
                   tokens_per_step=per_step, tok_s=tok_s, equal=outputs == reference)
        base = rows[0]["tok_s"] if rows else tok_s
        rows.append(row)
        acc = f"{row['acceptance']:.1%}" if drafted else "–"
        print(f"| {k} | {acc} | {lengths or '–'} | {per_step:.2f} | {tok_s:.1f} | {tok_s / base:.2f}× | "
              f"{row['equal']} |", flush=True)
    return rows


def oracle_mode(args: argparse.Namespace) -> list[dict]:
    options = load_options_from_args(args)
    cfg = resolve_model_config(args.preset, None, options)
    model = build_model(cfg, seed=0, device=args.device, load_format=options.load_format)
    on_gpu = args.device.startswith("cuda")
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    rows = []
    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    print(f"# {cfg.name} ({cfg.n_layers} layers) on {name}: context {args.context}, {args.new_tokens} greedy tokens, "
          f"k = {args.k}; oracle drafts kept with probability `accept`")
    print("| batch | engine | accept | acceptance | tokens / step | step ms | tok/s per request | vs k=0 default |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in [int(x) for x in args.batches.split(",")]:
        gen = torch.Generator().manual_seed(batch)
        prompts = [torch.randint(0, min(cfg.vocab_size, 30000), (args.context,), generator=gen).tolist()
                   for _ in range(batch)]
        pages = batch * (-(-(args.context + args.new_tokens + 16) // cfg.page_size) + 1)
        pool = PoolConfig(num_slots=batch, max_batch_tokens=max(2048, batch * (args.k + 1)), num_pages=pages)

        def engine(k: int, drafter=None, graphs: bool = False, pool: PoolConfig = pool) -> Engine:
            # (on the CPU, k > 0 with graphs runs the graphs' fixed-shape steps eagerly: graph_capture off)
            e = Engine(model, pool, cuda_graph=graphs and (on_gpu or k > 0), overlap=graphs, speculative_num_steps=k,
                       drafter=drafter, graph_capture=on_gpu)
            if graphs and on_gpu:
                e.capture_graphs(args.context + args.new_tokens + 16)
            return e

        base = decode_run(engine(0, graphs=True), prompts, params, args.device)
        refs = {f"req-{i}": out for i, out in enumerate(base["outputs"])}
        runs = [("k=0 default", None, base), ("k=0 eager", None, decode_run(engine(0), prompts, params, args.device))]
        rounds = 4 if on_gpu else 1  # fp32 on the CPU: every run's tokens are k = 0's
        if args.k and on_gpu:  # untimed: the verification's kernels at this batch compiled before the first timed run
            _, refs, _, _ = oracle_run(lambda d: engine(args.k, d, True), refs, 1.0, cfg.vocab_size, batch,
                                       prompts, params, args.device, rounds)
            moved = sum(refs[f"req-{i}"] != out for i, out in enumerate(base["outputs"]))
            if moved:
                print(f"| {batch} | references | – | the oracle drafts a speculative run's tokens ({moved} of {batch} "
                      "requests differ from k=0) |")
        graph_modes = [g.strip() == "on" for g in args.graphs.split(",")]
        for accept in [float(x) for x in args.accept.split(",")]:
            own, kept = refs, None
            if True in graph_modes:  # the graphs' run, repeated until it drafts its own tokens
                kept, own, n, fixed = oracle_run(lambda d: engine(args.k, d, True), refs, accept, cfg.vocab_size,
                                                 batch, prompts, params, args.device, rounds)
                if not fixed:
                    print(f"| {batch} | k={args.k} graphs | {accept} | its tokens still part from the references it "
                          f"drafts after {n} runs: acceptance below the set rate |")
            for graphs in graph_modes:
                label = f"k={args.k} {'graphs' if graphs else 'eager'}"
                if graphs:
                    run = kept
                else:
                    drafter = OracleDrafter(own, accept, cfg.vocab_size, seed=batch)
                    run = decode_run(engine(args.k, drafter), prompts, params, args.device)
                if not on_gpu and run["outputs"] != base["outputs"]:  # fp32: speculation must not change a token
                    print(f"| {batch} | {label} | {accept} | tokens differ from k=0 |")
                runs.append((label, accept, run))
        for label, accept, run in runs:
            acc = f"{run['accepted'] / run['drafted']:.1%}" if run["drafted"] else "–"
            print(f"| {batch} | {label} | {'–' if accept is None else accept} | {acc} | {run['tokens_per_step']:.2f} | "
                  f"{run['step_ms']:.2f} | {run['tok_s_per_request']:.1f} | "
                  f"{run['tok_s_per_request'] / base['tok_s_per_request']:.2f}× |", flush=True)
            rows.append(dict(batch=batch, engine=label, accept=accept,
                             **{k: v for k, v in run.items() if k != "outputs"}))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("mtp", help="the default model's MTP drafts, single-stream")
    m.add_argument("--steps", default="0,1,2,3", help="k values (default: %(default)s)")
    m.add_argument("--prompts", type=int, default=4)
    m.add_argument("--prompt-len", type=int, default=64)
    m.add_argument("--new-tokens", type=int, default=128)
    m.add_argument("--repeats", type=int, default=2, help="runs per prompt and k, the fastest kept")
    m.add_argument("--device", default="cpu")
    m.add_argument("--graphs", action="store_true",
                   help="CUDA graphs (k = 0: decode graphs; k > 0: engine/spec_graphs.py)")
    m.add_argument("--json", default=None)
    o = sub.add_parser("oracle", help="oracle drafts of a set acceptance on a preset")
    o.add_argument("--preset", default="bench")
    o.add_argument("--accept", default="0,0.5,0.8,1.0")
    o.add_argument("--batches", default="1,8,64")
    o.add_argument("--k", type=int, default=3)
    o.add_argument("--graphs", default="off,on", help="speculative steps without and with CUDA graphs")
    o.add_argument("--context", type=int, default=1024)
    o.add_argument("--new-tokens", type=int, default=128)
    o.add_argument("--device", default="cuda")
    o.add_argument("--json", default=None)
    add_load_args(o)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = mtp_mode(args) if args.mode == "mtp" else oracle_mode(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
