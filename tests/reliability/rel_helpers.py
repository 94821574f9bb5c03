"""Shared by the fault tests of tests/reliability: start workers and routers on 127.0.0.1 (several at once, each
stopped by pid), read a worker's own Stats, wait until a worker's pools are full again, the single-process
reference tokens, and the router's count of requests by how they ended (its Prometheus endpoint)."""

from __future__ import annotations

import asyncio
import functools
import re
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).parents[1] / "router"))
from router_helpers import channel, collect, generate_request, run, stub_of, wait_all_free  # noqa: E402

from sparsepd.cluster_token import AuthorizedStub, token_from_env  # noqa: E402
from sparsepd.deploy.launch import Child, start, stop  # noqa: E402
from sparsepd.proto import worker_pb2, worker_pb2_grpc  # noqa: E402

__all__ = ["Fleet", "channel", "collect", "generate_request", "outcome_of", "reference", "router_counts",
           "router_outcomes", "run", "sampled_reference", "stub_of", "wait_all_free", "wait_worker_free",
           "worker_stats"]

# Small pools: a request of ≤ 64 prompt tokens and ≤ 300 new ones needs ≤ 23 pages of 16 tokens.
WORKER = ["--preset", "tiny", "--num-slots", "8", "--max-batch-tokens", "128", "--num-pages", "64"]


class Fleet:
    """The processes of one test module: started several at a time, all stopped by pid at the end."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def start(self, specs: dict[str, tuple[list[str], dict | None]]) -> dict[str, Child]:
        """Start `{name: (args, env)}` at once (2 cores: about twice as fast as one after another)."""
        started: dict[str, Child] = {}
        errors: list[BaseException] = []

        def one(name: str, args: list[str], env: dict | None) -> None:
            try:
                started[name] = start(name, args, timeout_s=180, env=env)
            except BaseException as exc:  # noqa: BLE001 - reported below, after every thread is done
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(name, args, env)) for name, (args, env) in specs.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.children += started.values()
        if errors:
            raise errors[0]
        return started

    def workers(self, **specs: tuple[str, dict | None, list[str]]) -> dict[str, Child]:
        """`name=(role, env, extra args)` with role "prefill" or "decode", on the small WORKER pools."""
        return self.start({name: ([f"{role}-worker", *WORKER, *extra], env)
                           for name, (role, env, extra) in specs.items()})

    def routers(self, **specs: tuple[list[Child], list[Child], list[str]]) -> dict[str, Child]:
        """`name=(prefill workers, decode workers, extra args)`: one router each, with a metrics port."""
        out = {}
        for name, (prefill, decode, extra) in specs.items():
            args = ["router", "--port", "0", "--metrics-port", "0", "--log-level", "WARNING", *extra]
            args += [x for w in prefill for x in ("--prefill", w.ready["grpc"])]
            args += [x for w in decode for x in ("--decode", w.ready["grpc"])]
            out[name] = (args, None)
        return self.start(out)

    def stop_all(self) -> None:
        """Routers first (they were started last), then the workers, each group at once."""
        routers = [c for c in self.children if c.ready.get("role") == "router"]
        for group in (routers, [c for c in self.children if c not in routers]):
            threads = [threading.Thread(target=stop, args=(c,)) for c in group]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

    def __getitem__(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)


async def worker_stats(child: Child) -> worker_pb2.StatsResponse:
    """A worker's own Stats (what the router's GetLoads reports, asked directly: works with the router gone)."""
    prefill = child.ready["role"] == "prefill"
    stub_cls = worker_pb2_grpc.PrefillWorkerStub if prefill else worker_pb2_grpc.DecodeWorkerStub
    async with grpc.aio.insecure_channel(child.ready["grpc"]) as ch:
        return await AuthorizedStub(stub_cls(ch), token_from_env()).Stats(worker_pb2.StatsRequest(), timeout=5)


async def wait_worker_free(child: Child, timeout: float = 15.0) -> worker_pb2.StatsResponse:
    """Poll a worker until every page and slot is free and nothing runs or waits there."""
    deadline = time.monotonic() + timeout
    while True:
        s = await worker_stats(child)
        if (s.free_pages, s.free_slots, s.running, s.waiting) == (s.num_pages, s.num_slots, 0, 0):
            return s
        assert time.monotonic() < deadline, f"{child.name} still holds after {timeout} s: {s}"
        await asyncio.sleep(0.1)


@functools.cache
def _model():
    from sparsepd.model.weights import build_model
    from sparsepd.model_config import get_preset

    return build_model(get_preset("tiny"), seed=0)


@functools.cache
def _reference(prompt: tuple[int, ...], n: int, seed: int | None = None, temperature: float = 0.0) -> tuple[int, ...]:
    import torch

    from sparsepd.engine.generate import generate
    from sparsepd.engine.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=n, ignore_eos=True, seed=seed, temperature=temperature)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # beside a deployment's processes on a small machine, one thread is much faster
    try:
        return tuple(generate(_model(), list(prompt), params).output_ids)
    finally:
        torch.set_num_threads(threads)


def reference(prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of the single-process reference model (tiny, seed 0) for `prompt`."""
    return list(_reference(tuple(prompt), n))


def sampled_reference(prompt: list[int], n: int, seed: int, temperature: float) -> list[int]:
    """The reference model's tokens sampled with `seed` at `temperature` (what a seeded request must produce)."""
    return list(_reference(tuple(prompt), n, seed, temperature))


def router_outcomes(router: Child) -> Counter[str]:
    """The router's `sparsepd_router_requests_total` by outcome (finish reason or lower-case status name)."""
    return router_counts(router, "requests", "outcome")


def router_counts(router: Child, name: str, label: str) -> Counter[str]:
    """A labelled counter of the router's Prometheus endpoint: `sparsepd_router_<name>_total` by `label`."""
    with urllib.request.urlopen(router.ready["metrics"], timeout=5) as r:
        text = r.read().decode()
    found = re.findall(rf'^sparsepd_router_{name}_total\{{{label}="([a-z_]+)"\}} ([0-9.e+]+)$', text, re.M)
    return Counter({k: int(float(v)) for k, v in found})


async def outcome_of(stub, request, timeout: float = 60.0) -> tuple[str, str, list[int]]:
    """(finish reason or status name, status details, output ids) of one Generate call."""
    try:
        _, done = await collect(stub, request, timeout=timeout)
        return done.finish_reason, "", list(done.output_ids)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details() or "", []
