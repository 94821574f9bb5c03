"""How long the decode worker's control calls wait while it decodes (issue #32), in one process on the CPU: the
real engine (the `tiny` preset, CPU reference ops) and `DecodeWorker` with its loop thread, `--running` requests
decoding (started as a colocated worker starts them), and a second thread that, `--calls` times at random moments,
reserves a slot and pages the way the router's Reserve does (`DecodeWorker.reserve`) and releases them. Prints the
median and p90 of the reserve's latency, and of the decode step's, in ms.

The worker's lock used to be held through the whole step, so a reserve waited for the rest of the step in progress
(on average about half a step); the engine now lets go of it while the forward runs, so a reserve waits for a
step's bookkeeping only. No gRPC here: the round trip's own cost is not in these numbers.

    OMP_NUM_THREADS=1 python3 -P bench/bench_control_wait.py [--running 8] [--calls 60]
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time

import torch

from sparsepd.decode_worker.worker import DecodeWorker
from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--running", type=int, default=8, help="requests decoding meanwhile")
    p.add_argument("--calls", type=int, default=60, help="reserve + release pairs timed")
    p.add_argument("--prompt-len", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model = build_model(get_preset("tiny"), seed=0)
    engine = Engine(model, PoolConfig(num_slots=args.running + 2, max_batch_tokens=512, num_pages=512))
    worker = DecodeWorker(engine)
    params = SamplingParams(max_new_tokens=800 - args.prompt_len, ignore_eos=True)
    steps: list[float] = []
    last = [time.perf_counter()]

    def on_step(step, updates):
        now = time.perf_counter()
        steps.append((now - last[0]) * 1e3)
        last[0] = now

    worker.listeners.append(on_step)
    loop = threading.Thread(target=worker.run, daemon=True)
    loop.start()
    for i in range(args.running):
        prompt = [rng.randrange(256) for _ in range(args.prompt_len)]
        res = worker.reserve(f"run{i}", len(prompt), params, ttl_s=600)
        worker.start_local(f"run{i}", res.transfer_id, prompt)
    while len(steps) < 5:  # the prompts prefilled: decode steps from here on
        time.sleep(0.05)
    steps.clear()
    waits = []
    for i in range(args.calls):
        time.sleep(rng.uniform(0.01, 0.1))
        t0 = time.perf_counter()
        worker.reserve(f"probe{i}", args.prompt_len, SamplingParams(max_new_tokens=8), ttl_s=60)
        waits.append((time.perf_counter() - t0) * 1e3)
        worker.release(f"probe{i}")
    worker.release_all()
    worker.stop_event.set()
    loop.join(30)
    q = statistics.quantiles
    print(f"running {args.running}, {args.calls} reserves: reserve ms p50 {statistics.median(waits):.2f} "
          f"p90 {q(waits, n=10)[-1]:.2f} max {max(waits):.2f}; decode step ms p50 {statistics.median(steps):.1f} "
          f"p90 {q(steps, n=10)[-1]:.1f} ({len(steps)} steps)")


if __name__ == "__main__":
    main()
