"""Profile a few decode steps of the engine on the GPU (`bench` preset): the top ops by self CPU and CUDA
time, to see where a step goes. `python3 -P bench/profile_engine.py --batch 16 --context 1024`"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    cfg = get_preset("bench")
    model = build_model(cfg, seed=0, device="cuda")
    pages = args.batch * (-(-(args.context + 64) // cfg.page_size))
    engine = Engine(model, PoolConfig(num_slots=args.batch, max_batch_tokens=8192, num_pages=pages))
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_new_tokens=args.steps + 8, ignore_eos=True)
    reqs = [engine.submit(torch.randint(0, cfg.vocab_size, (args.context,), generator=gen).tolist(), params)
            for _ in range(args.batch)]
    while any(not r.output_ids for r in reqs):
        engine.step()
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
