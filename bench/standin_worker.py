#!/usr/bin/env python3
"""A stand-in colocated worker for measuring the router alone: the worker control API (worker.proto: Reserve,
Prefill with the first token in the stream, StreamTokens, Release, Health, Stats) with no engine behind it.
Every `--step-ms` it sends one StepBatch with one token for each running request (ending each with "length" at
its max_new_tokens), as a colocated worker's decode loop does, so the router sees a real token stream at a rate
no CPU engine reaches. Prints `READY {"address": ...}` once serving; stops on SIGTERM/SIGINT.

    python3 bench/standin_worker.py --step-ms 5       # used by bench/bench_service.py --standin
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time

import grpc

from sparsepd.fingerprint import deployment_fingerprint
from sparsepd.proto import worker_pb2, worker_pb2_grpc

ROLE = "colocated"
SLOTS = 4096


class StandIn(worker_pb2_grpc.DecodeWorkerServicer, worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, step_s: float, fingerprint: str, endpoint: str = ""):
        self.step_s, self.fingerprint, self.endpoint = step_s, fingerprint, endpoint
        self.limits: dict[str, int] = {}  # reserved: request id → max_new_tokens
        self.running: dict[str, list[int]] = {}  # request id → [tokens sent, max_new_tokens]
        self.listeners: list[asyncio.Queue] = []
        self.steps = 0

    async def Reserve(self, request, context):
        self.limits[request.request_id] = request.sampling.max_new_tokens or 16
        ticket = worker_pb2.Ticket(transfer_id=request.request_id, endpoint=self.endpoint, page_ids=[1],
                                   slot=len(self.limits), expires_at_unix_s=time.time() + 60,
                                   fingerprint=self.fingerprint)
        return worker_pb2.ReserveResponse(ticket=ticket)

    async def Prefill(self, request, context):
        results = []
        for r in request.requests:
            for rid in (r.request_id, *(f.request_id for f in r.forks)):
                self.running[rid] = [0, self.limits.pop(rid, 16)]
                results.append(worker_pb2.PrefillResult(request_id=rid, ok=True, first_token_in_stream=True))
        return worker_pb2.PrefillResponse(results=results)

    async def Release(self, request, context):
        found = self.limits.pop(request.request_id, None) is not None
        found = self.running.pop(request.request_id, None) is not None or found
        return worker_pb2.ReleaseResponse(found=found)

    async def StreamTokens(self, request, context):
        queue: asyncio.Queue = asyncio.Queue()
        self.listeners.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self.listeners.remove(queue)

    async def Health(self, request, context):
        return worker_pb2.HealthResponse(serving=True, role=ROLE, fingerprint=self.fingerprint)

    async def Stats(self, request, context):
        busy = len(self.limits) + len(self.running)
        return worker_pb2.StatsResponse(role=ROLE, num_pages=SLOTS * 4, free_pages=(SLOTS - busy) * 4, num_slots=SLOTS,
                                        free_slots=SLOTS - busy, running=len(self.running), endpoint=self.endpoint)

    async def loop(self) -> None:
        """One token per running request every step (token = the step number mod 200 + 32: printable bytes)."""
        while True:
            await asyncio.sleep(self.step_s)
            if not self.running:
                continue
            self.steps += 1
            events = []
            for rid, state in list(self.running.items()):
                state[0] += 1
                done = state[0] >= state[1]
                events.append(worker_pb2.TokenEvent(request_id=rid, token_ids=[32 + self.steps % 200],
                                                    finish_reason="length" if done else ""))
                if done:
                    del self.running[rid]
            batch = worker_pb2.StepBatch(step=self.steps, events=events)
            for queue in self.listeners:
                queue.put_nowait(batch)


async def serve(args: argparse.Namespace) -> None:
    fingerprint = deployment_fingerprint(args.preset, None, args.seed, "auto", "auto", None)
    server = grpc.aio.server()
    standin = StandIn(args.step_ms / 1e3, fingerprint)
    worker_pb2_grpc.add_DecodeWorkerServicer_to_server(standin, server)
    worker_pb2_grpc.add_PrefillWorkerServicer_to_server(standin, server)
    port = server.add_insecure_port("127.0.0.1:0")
    standin.endpoint = f"127.0.0.1:{port}"
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    ticker = asyncio.create_task(standin.loop())
    print("READY " + json.dumps({"address": standin.endpoint}), flush=True)
    await stop.wait()
    ticker.cancel()
    await server.stop(grace=0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step-ms", type=float, default=5.0, help="ms between token steps (default: 5)")
    p.add_argument("--preset", default="tiny", help="the model the router is told of (its fingerprint)")
    p.add_argument("--seed", type=int, default=0)
    asyncio.run(serve(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
