"""The prefix cache's host tier on a working set 4x the device tier (issue 32's last target: the host tier serves
≥ 50% of the hits), in one engine, no service around it.

Workload: C conversations of T turns that all begin with one shared system prompt; turn t of a conversation sends
its previous prompt, that turn's output and a new user message (`--user-len` tokens). Turns go round: turn 1 of
every conversation, then turn 2 of every one, ..., B conversations at a time, so that by the time a conversation
comes back its previous turn has been pushed out of the device tier by the others.

Sizing: the working set is the distinct pages of every conversation's last turn plus the system prompt's; the
device tier (the pool's pages beyond those of the largest request, which is what the tree may keep when a request
is looked up, and the snapshot store's entries) is a quarter of it (`--device-share`), and the host tier
(`--prefix-cache-host-bytes`) holds all of it. (So requests run one at a time: a batch of `--batch` is queued
at once and admitted as pages free.) Configurations: `host`
(that host tier) and `device` (the same device tier, no host tier); each reports hit tokens, those served by the
host tier (a hit that copied a snapshot or pages back), the share, prefill tokens computed, host pages and
snapshots moved and restored, and the wall time.

    python3 -P bench/prefix_host_tier.py --preset tiny --device cpu                     # a few minutes on a CPU
    python3 -P bench/prefix_host_tier.py --preset bench --device cuda:0 --conversations 64 --turns 4 \\
        --system-len 2048 --user-len 256 --output-len 32 --batch 8 --json $OUT/prefix_host_tier.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import PoolConfig, bytes_per_page, bytes_per_snapshot
from sparsepd.engine.sampling import SamplingParams
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset


def _ids(n: int, gen: torch.Generator, vocab: int) -> list[int]:
    return torch.randint(0, min(vocab, 256), (n,), generator=gen).tolist()


def plan(args, cfg) -> dict:
    """Pages and restore points of the working set; the pools and host bytes that make the device tier a quarter."""
    page = cfg.page_size
    last_len = args.system_len + args.turns * args.user_len + (args.turns - 1) * args.output_len
    conv_pages = -(-last_len // page) - args.system_len // page  # a conversation's own pages
    working_pages = args.system_len // page + args.conversations * conv_pages
    working_points = working_pages  # at most a restore point a page
    request_pages = -(-(last_len + args.output_len + 1) // page) + 1  # the largest request and one page of headroom
    tier_pages = max(1, int(working_pages * args.device_share))
    entries = max(1, int(working_points * args.device_share))
    host = int(1.25 * (working_pages * bytes_per_page(cfg) + working_points * bytes_per_snapshot(cfg)))
    return dict(working_pages=working_pages, working_points=working_points, device_tier_pages=tier_pages,
                num_pages=tier_pages + request_pages, entries=entries, host_bytes=host, last_prompt_len=last_len)


def run(model, args, sizes: dict, host_bytes: int) -> dict:
    cfg = model.cfg
    engine = Engine(model, PoolConfig(num_slots=args.batch, max_batch_tokens=args.max_batch_tokens,
                                      num_pages=sizes["num_pages"], prefix_cache_entries=sizes["entries"],
                                      prefix_cache_host_bytes=host_bytes))
    gen = torch.Generator().manual_seed(args.seed)
    system = _ids(args.system_len, gen, cfg.vocab_size)
    history = [list(system) for _ in range(args.conversations)]
    params = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)
    computed, prompt_tokens, start = 0, 0, time.perf_counter()
    for _turn in range(args.turns):
        for first in range(0, args.conversations, args.batch):
            convs = range(first, min(first + args.batch, args.conversations))
            prompts = []
            for c in convs:
                history[c] += _ids(args.user_len, gen, cfg.vocab_size)
                prompts.append(list(history[c]))
            for c, request in zip(convs, engine.generate(prompts, params), strict=True):
                computed += len(request.prompt_ids) - request.cached_tokens
                prompt_tokens += len(request.prompt_ids)
                history[c] += request.output_ids
    if engine.pools.device.type == "cuda":
        torch.cuda.synchronize(engine.pools.device)
    wall = time.perf_counter() - start
    s = engine.prefix_cache.stats
    return dict(hit_tokens=s.hit_tokens, host_hit_tokens=s.host_hit_tokens,
                host_share=s.host_hit_tokens / s.hit_tokens if s.hit_tokens else 0.0, prompt_tokens=prompt_tokens,
                prefill_computed=computed,
                host_snapshot_moves=s.host_inserts, host_page_moves=s.host_page_inserts,
                host_page_restores=s.host_page_restores, host_evictions=s.host_evictions + s.host_page_evictions,
                host_bytes_used=engine.prefix_cache.host_used, wall_s=round(wall, 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--system-len", type=int, default=64)
    ap.add_argument("--user-len", type=int, default=24)
    ap.add_argument("--output-len", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4, help="conversations submitted at once")
    ap.add_argument("--max-batch-tokens", type=int, default=4096)
    ap.add_argument("--device-share", type=float, default=0.25, help="the device tier's size over the working set's")
    ap.add_argument("--configs", default="host,device")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the figures as JSON here")
    args = ap.parse_args()
    cfg = get_preset(args.preset)
    if args.turns < 2 or args.system_len + args.user_len + args.output_len < cfg.page_size:
        ap.error(f"a hit needs a whole shared page: system + user + output ({args.system_len} + {args.user_len} + "
                 f"{args.output_len}) must reach {args.preset}'s page of {cfg.page_size} tokens, with 2 turns or more")
    model = build_model(cfg, seed=0, device=args.device)
    sizes = plan(args, cfg)
    print(f"# {args.preset} on {args.device}: {args.conversations} conversations x {args.turns} turns, system "
          f"{args.system_len}, user {args.user_len}, output {args.output_len}; working set {sizes['working_pages']} "
          f"pages / {sizes['working_points']} restore points, device tier {sizes['device_tier_pages']} pages + "
          f"{sizes['entries']} snapshots (pool {sizes['num_pages']} pages), host tier {sizes['host_bytes']} bytes")
    rows = {}
    with torch.inference_mode():
        for config in args.configs.split(","):
            rows[config] = run(model, args, sizes, sizes["host_bytes"] if config == "host" else 0)
    keys = list(next(iter(rows.values())))
    print("| config | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for config, row in rows.items():
        print(f"| {config} | " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values())
              + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), sizes=sizes, results=rows), f, indent=1)


if __name__ == "__main__":
    main()
