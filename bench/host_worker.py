#!/usr/bin/env python3
"""The real `sparsepd decode-worker` (any of its flags, e.g. --colocated) with the model's forward replaced by
bench/bench_host.py's stand-in: the worker's control server, decode loop, token stream, scheduler, pools and
batch metadata all run as in production, only the network's arithmetic is gone. Put behind a real router it
measures the worker's host cost per output token with no device (bench/bench_service.py --host-worker).

The engine is bench_host's geometry (the `bench` preset's page size, window and layer kinds at `tiny`'s
dimensions and vocabulary), so the router is told `--preset tiny`. `--device-ms MS` makes each forward also wait
MS milliseconds with the GIL released (a stand-in for the device time the step's host sync waits for) so the
loop's timing, the engine lock's hold time and the hand-offs resemble a GPU worker's; `--device-spin` spends that
wait busy, as a CUDA event sync with the default flags does (a GPU worker's CPU time then counts it).

    python3 bench/host_worker.py --colocated --no-cluster-auth --num-slots 256 --num-pages 4096 [--device-ms 4]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import ctypes
import hashlib
import sys
import threading
import time
from pathlib import Path

from bench_host import StandInRunner, host_config

from sparsepd.decode_worker import args as decode_args
from sparsepd.decode_worker import main as decode_main
from sparsepd.engine.engine import Engine
from sparsepd.model.weights import build_model


def spin(seconds: float, block: bytes = bytes(1 << 16)) -> None:
    """Busy-wait with the GIL released, as a CUDA event sync does with the default flags (hashlib drops the GIL
    while it hashes a buffer this size)."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        hashlib.sha1(block)


def standin_engine(device_s: float, wait=time.sleep):
    """An `Engine` factory with decode_worker.main's signature: bench_host's model and stand-in runner."""

    class DeviceWait(StandInRunner):
        def _forward(self, work, final_rows=None, logit_rows=None):
            logits = super()._forward(work, final_rows, logit_rows)
            if device_s > 0:
                wait(device_s)
            return logits

    def make(model, pool_config, **kwargs) -> Engine:
        model = build_model(host_config(), seed=0, device="cpu")
        kwargs.update(cuda_graph=False, speculative_num_steps=0, mtp=None, vocabulary=None)
        engine = Engine(model, pool_config, **kwargs)
        engine.runner = DeviceWait(model, engine.pools, pool_config.max_batch_tokens)
        engine.scheduler.runner = engine.runner
        return engine

    return make


def profile_loop(path: str) -> None:
    """Run DecodeWorker.run (the decode loop thread) under cProfile, dumped to path when the loop ends."""
    from sparsepd.decode_worker.worker import DecodeWorker

    run = DecodeWorker.run

    def profiled(self) -> None:
        profile = cProfile.Profile()
        try:
            profile.runcall(run, self)
        finally:
            profile.dump_stats(path)

    DecodeWorker.run = profiled


def name_os_threads() -> None:
    """Give each Python thread its name as the OS thread name (/proc/PID/task/*/comm: 15 bytes), so that the CPU
    time by thread (bench_service.py) tells the decode loop, the event loop and the executor's threads apart."""
    libc = ctypes.CDLL(None)
    bootstrap = threading.Thread._bootstrap_inner

    def named(self):
        libc.prctl(15, self.name.replace("ThreadPoolExecutor", "pool").encode()[:15], 0, 0, 0)  # PR_SET_NAME
        bootstrap(self)

    threading.Thread._bootstrap_inner = named
    libc.prctl(15, b"main", 0, 0, 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="cProfile the decode loop thread and the event loop (the main thread) into DIR/loop.prof and "
                        "DIR/main.prof (pstats), written when the worker stops")
    p.add_argument("--device-ms", type=float, default=0.0,
                   help="ms each forward waits with the GIL released, as for the device (default: 0)")
    p.add_argument("--device-spin", action="store_true",
                   help="with --device-ms: spin through the wait (a default CUDA event sync) instead of sleeping")
    decode_args.add_arguments(p)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    name_os_threads()
    decode_main.Engine = standin_engine(args.device_ms / 1e3, spin if args.device_spin else time.sleep)
    if not args.profile:
        return asyncio.run(decode_main.serve(args))
    Path(args.profile).mkdir(parents=True, exist_ok=True)
    profile_loop(str(Path(args.profile) / "loop.prof"))
    profile = cProfile.Profile()
    try:
        return profile.runcall(asyncio.run, decode_main.serve(args))
    finally:
        profile.dump_stats(str(Path(args.profile) / "main.prof"))


if __name__ == "__main__":
    sys.exit(main())
