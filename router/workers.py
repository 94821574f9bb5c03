"""The router's view of its workers: one gRPC channel each, liveness from Health/Stats polls, and the
load numbers dispatch chooses by (queued prefill tokens; free pages, running requests).

Workers come from the command line (`--prefill`, `--decode`, `--colocated` addresses) or register
themselves (`WorkerRegistry.Register`, repeated every heartbeat; the call must carry the cluster token,
sparsepd/cluster_token.py). Either way a worker serves only if it runs the router's own model: its
registration and its Health carry its model fingerprint, checked against the one the router computed from
its own preset, checkpoint and seed (never learned from a worker; an empty one is refused). A colocated
worker is one process that serves both roles: it appears as a prefill handle and a decode handle paired with
each other, and a batch sent to its prefill handle reserves on its own decode handle. A worker is dead after
a failed poll or a failed call, and alive again after a good poll; the router restarts nothing itself, it
only stops sending work to a dead worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc

from sparsepd.cluster_token import AuthorizedStub
from sparsepd.proto import worker_pb2, worker_pb2_grpc
from sparsepd.tls import TlsConfig, cluster_channel

log = logging.getLogger("sparsepd.router")


ROLES = ("prefill", "decode", "colocated")
HEARTBEAT_S = 5.0


@dataclass(eq=False)
class WorkerHandle:
    role: str  # "prefill" or "decode": which control API the router calls on it
    address: str
    index: int
    kind: str = ""  # what its Health says it is: the role, or "colocated"
    pair: WorkerHandle | None = None  # a colocated worker's other handle
    channel: grpc.aio.Channel | None = None
    stub: object = None
    alive: bool = False
    stats: worker_pb2.StatsResponse = field(default_factory=worker_pb2.StatsResponse)
    stats_at: float = 0.0
    queued_tokens: int = 0  # prefill: prompt tokens sent and not yet answered
    inflight: int = 0  # prefill: requests in batches sent and not yet answered
    reserved_pages: int = 0  # decode: pages reserved since the last Stats (the poll resets it)
    transfer_bytes: int = 0  # prefill: states pushed (as its results report)
    transfer_ms: float = 0.0
    transfers: int = 0
    last_error: str = ""

    def __post_init__(self) -> None:
        self.kind = self.kind or self.role

    def connect(self, tls: TlsConfig, token: str | None) -> None:
        self.channel = cluster_channel(self.address, tls)
        stub_cls = worker_pb2_grpc.PrefillWorkerStub if self.role == "prefill" else worker_pb2_grpc.DecodeWorkerStub
        self.stub = AuthorizedStub(stub_cls(self.channel), token)

    @property
    def free_pages(self) -> int:
        return max(0, self.stats.free_pages - self.reserved_pages)

    def mark_dead(self, why: str) -> None:
        if self.alive:
            log.warning("%s worker %s is unreachable: %s", self.role, self.address, why)
        self.alive, self.last_error = False, why

    def describe(self, internal: bool = True) -> dict:
        """What GetServerInfo lists; the address and the last error (which names addresses) only when internal;
        `id` tells processes apart either way (a colocated worker's two handles share it)."""
        s = self.stats
        process = min(self.index, self.pair.index) if self.pair is not None else self.index
        out = {"id": f"worker-{process}", "role": self.role, "kind": self.kind, "alive": self.alive,
               "running": s.running, "waiting": s.waiting, "num_pages": s.num_pages, "free_pages": s.free_pages,
               "num_slots": s.num_slots, "free_slots": s.free_slots, "queued_tokens": self.queued_tokens}
        return {**out, "address": self.address, "last_error": self.last_error} if internal else out


class WorkerPool:
    def __init__(self, prefill: list[str], decode: list[str], colocated: list[str] | None = None,
                 poll_s: float = 0.5, rpc_timeout_s: float = 2.0, fingerprint: str = "", token: str | None = None,
                 tls: TlsConfig | None = None):
        """fingerprint: the model fingerprint every worker must run ("" checks nothing and refuses every
        registration); token and tls: how to call the workers (sparsepd/cluster_token.py, sparsepd/tls.py)."""
        self.prefill: list[WorkerHandle] = []
        self.decode: list[WorkerHandle] = []
        self.poll_s, self.rpc_timeout_s = poll_s, rpc_timeout_s
        self.changed = asyncio.Event()  # set after every poll round (dispatch retries waiting work then)
        self.on_added: list = []  # callbacks(handle) for workers that join after start (registration)
        self.fingerprint, self.token, self.tls = fingerprint, token, tls or TlsConfig()
        self.started = False
        for role, addresses in (("prefill", prefill), ("decode", decode), ("colocated", colocated or [])):
            for address in addresses:
                self._add(role, address)

    @property
    def all(self) -> list[WorkerHandle]:
        return [*self.prefill, *self.decode]

    def find(self, kind: str, address: str) -> list[WorkerHandle]:
        return [w for w in self.all if w.kind == kind and w.address == address]

    def _add(self, kind: str, address: str) -> list[WorkerHandle]:
        index = len(self.all)
        if kind == "colocated":
            p, d = WorkerHandle("prefill", address, index, kind), WorkerHandle("decode", address, index + 1, kind)
            p.pair, d.pair = d, p
            added = [p, d]
        else:
            added = [WorkerHandle(kind, address, index)]
        for w in added:
            (self.prefill if w.role == "prefill" else self.decode).append(w)
            if self.started:
                w.connect(self.tls, self.token)
        return added

    async def register(self, request: worker_pb2.RegisterRequest) -> tuple[bool, str]:
        """A worker announces itself: add it (or poll it now if known); refuse bad or mismatched ones."""
        if request.role not in ROLES:
            return False, f"role {request.role!r} is not one of {list(ROLES)}"
        host, _, port = request.address.rpartition(":")
        if not host or not port.isdigit():
            return False, f"address {request.address!r} is not HOST:PORT"
        if not self.fingerprint:
            return False, "this router has no model fingerprint to check workers against"
        if request.fingerprint != self.fingerprint:
            got = f"model fingerprint {request.fingerprint}" if request.fingerprint else "no model fingerprint"
            return False, (f"it registered with {got}, the deployment's is {self.fingerprint}: every worker must "
                           "run the router's preset, checkpoint and seed")
        handles = self.find(request.role, request.address)
        if not handles:
            handles = self._add(request.role, request.address)
            log.info("%s worker %s registered", request.role, request.address)
            for w in handles:
                for callback in self.on_added:
                    callback(w)
        stale = [w for w in handles if not w.alive]  # a live one's heartbeat needs nothing: the poll loop has it
        if stale:
            await asyncio.gather(*(self._poll(w) for w in stale))
            self.changed.set()
        alive = all(w.alive for w in handles)
        return True, "registered" if alive else f"registered, but not reachable yet: {handles[0].last_error}"

    async def start(self) -> None:
        self.started = True
        for w in self.all:
            w.connect(self.tls, self.token)
        await self.poll_once()

    async def close(self) -> None:
        for w in self.all:
            if w.channel is not None:
                await w.channel.close()

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(w) for w in self.all))
        self.changed.set()

    async def _poll(self, w: WorkerHandle) -> None:
        try:
            health = await w.stub.Health(worker_pb2.HealthRequest(), timeout=self.rpc_timeout_s)
            stats = await w.stub.Stats(worker_pb2.StatsRequest(), timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            w.mark_dead(f"{exc.code().name}: {exc.details()}")
            return
        if health.role != w.kind:
            w.mark_dead(f"it says it is a {health.role!r} worker, configured as {w.kind!r}")
            return
        if self.fingerprint and health.fingerprint != self.fingerprint:
            w.mark_dead(f"it runs another model: fingerprint {health.fingerprint or '(none)'}, the deployment's "
                        f"is {self.fingerprint} (same preset, checkpoint and seed everywhere)")
            return
        if not health.serving:
            w.mark_dead("not serving (shutting down)")
            return
        if not w.alive:
            log.info("%s worker %s is serving", w.role, w.address)
        w.alive, w.stats, w.stats_at, w.reserved_pages, w.last_error = True, stats, time.monotonic(), 0, ""

    def pick_prefill(self) -> WorkerHandle | None:
        """The live prefill worker with the fewest queued tokens."""
        live = [w for w in self.prefill if w.alive]
        return min(live, key=lambda w: (w.queued_tokens, w.index)) if live else None

    def decode_order(self) -> list[WorkerHandle]:
        """Live decode workers, most free pages first, then fewest running."""
        live = [w for w in self.decode if w.alive]
        return sorted(live, key=lambda w: (-w.free_pages, w.stats.running, w.index))
