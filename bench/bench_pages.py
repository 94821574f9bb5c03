"""Pages on demand (engine/scheduler.py): how many requests one engine holds at a fixed page budget when they
declare a large max_new_tokens and stop early, and what retraction costs when the pool holds half the
running set.

Requests of --prompt tokens declare --declared new tokens and are aborted after --keep tokens (a client that
stops reading, as the issue's workload). At --pages pages, an up-front reservation of prompt + declared
tokens would hold pages // pages_for(prompt + declared) of them; on demand the engine holds as many as
their used pages and its slots allow. Then the same requests with half the pages their peak needs: every
request still finishes, greedy tokens equal those of the roomy run, retractions counted.

    python3 -P bench/bench_pages.py --preset bench --device cuda    # prints a table
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset


def _prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(n)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(model, device: str, prompts, pages: int, slots: int, batch_tokens: int, declared: int, keep: int):
    """Submit every prompt at once, abort each after `keep` tokens; returns (outputs, peak running, seconds,
    retractions, output tokens)."""
    engine = Engine(model, PoolConfig(num_slots=slots, max_batch_tokens=batch_tokens, num_pages=pages),
                    cuda_graph=device.startswith("cuda"), overlap=True)
    params = SamplingParams(max_new_tokens=declared, ignore_eos=True)
    requests = [engine.submit(p, params, f"r{i}") for i, p in enumerate(prompts)]
    peak, start = 0, time.perf_counter()
    while engine.scheduler.has_work:
        engine.step()
        peak = max(peak, len(engine.scheduler.running))
        for r in requests:
            if r.finish_reason is None and len(r.output_ids) >= keep:
                engine.abort(r.request_id)
    _sync(device)
    seconds = time.perf_counter() - start
    assert engine.is_idle_and_empty()
    outputs = [r.output_ids[:keep] for r in requests]
    return outputs, peak, seconds, engine.scheduler.retractions, sum(len(o) for o in outputs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench")
    p.add_argument("--device", default="cuda")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--declared", type=int, default=32768)
    p.add_argument("--keep", type=int, default=256)
    p.add_argument("--reserved-holds", type=int, default=8, help="requests an up-front reservation would hold")
    p.add_argument("--batch-tokens", type=int, default=8192)
    args = p.parse_args()
    logging.getLogger("sparsepd.engine").setLevel(logging.ERROR)  # one line per retraction: counted instead
    cfg = get_preset(args.preset)
    model = build_model(cfg, seed=0, device=args.device)
    pages_for = lambda n: -(-n // cfg.page_size)  # noqa: E731
    pages = args.reserved_holds * pages_for(args.prompt + args.declared)
    prompts = _prompts(args.requests, args.prompt, cfg.vocab_size)
    print(f"# {args.preset} on {args.device}: {args.requests} requests of {args.prompt} prompt tokens declaring "
          f"{args.declared} new, aborted after {args.keep}; page = {cfg.page_size} tokens")
    print("| run | pages | slots | held at once (peak) | vs up-front | retractions | output tok/s | greedy = roomy |")
    print("|---|---|---|---|---|---|---|---|")
    roomy, peak, secs, retracted, tokens = run(model, args.device, prompts, pages, args.requests, args.batch_tokens,
                                               args.declared, args.keep)
    up_front = pages // pages_for(args.prompt + args.declared)
    print(f"| on demand | {pages} | {args.requests} | {peak} | {peak / up_front:.1f}× ({up_front}) | {retracted} | "
          f"{tokens / secs:,.0f} | - |")
    half = max(1, peak * pages_for(args.prompt + args.keep) // 2)
    out, peak2, secs2, retracted2, tokens2 = run(model, args.device, prompts, half, args.requests,
                                                 args.batch_tokens, args.declared, args.keep)
    print(f"| half the pages | {half} | {args.requests} | {peak2} | - | {retracted2} | {tokens2 / secs2:,.0f} | "
          f"{'yes' if out == roomy else 'NO'} |")


if __name__ == "__main__":
    main()
