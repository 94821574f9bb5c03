"""The router's view of its workers: one gRPC channel each, liveness from Health/Stats polls, and the
load numbers dispatch chooses by (queued prefill tokens; free pages and slots less the router's own
reservations not yet reported, router/placement.py).

Workers come from the command line (`--prefill`, `--decode`, `--colocated` addresses) or register
themselves (`WorkerRegistry.Register`, repeated every heartbeat; the call must carry the cluster token,
sparsepd/cluster_token.py). Either way a worker serves only if it runs the router's own model: its
registration and its Health carry its model fingerprint, checked against the one the router computed from
its own preset, checkpoint and seed (never learned from a worker; an empty one is refused). A colocated
worker is one process that serves both roles: it appears as a prefill handle and a decode handle paired with
each other, and a batch sent to its prefill handle reserves on its own decode handle. A worker is dead after
a failed call or poll (a poll that only timed out counts after SLOW_POLLS_DEAD in a row), and alive again
after a good poll. The router restarts nothing itself (`sparsepd serve` does): it stops sending work to a
dead worker, and forgets a registered one that stays dead for `forget_after_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import grpc

from sparsepd.cluster_token import AuthorizedStub
from sparsepd.proto import worker_pb2, worker_pb2_grpc
from sparsepd.router.placement import Placement
from sparsepd.tls import TlsConfig, cluster_channel

log = logging.getLogger("sparsepd.router")


ROLES = ("prefill", "decode", "colocated")
HEARTBEAT_S = 5.0
SLOW_POLLS_DEAD = 3  # a worker whose polls time out this often in a row is dead (a busy one answers late)


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
    cached: frozenset = frozenset()  # prefill: the hashes of its prefix-cache entries (sparsepd/prefix_hash.py)
    queued_tokens: int = 0  # prefill: prompt tokens sent and not yet answered
    inflight: int = 0  # prefill: requests in batches sent and not yet answered
    held_pages: int = 0  # decode: pages and slots of Reserve calls in flight (router/placement.py)
    held_slots: int = 0
    confirmed: deque = field(default_factory=deque)  # (monotonic time, pages) reserved, not in our Stats yet
    freed: deque = field(default_factory=deque)  # monotonic times a slot of ours came back, not in our Stats yet
    transfer_bytes: int = 0  # prefill: states pushed (as its results report)
    transfer_ms: float = 0.0
    transfers: int = 0
    last_error: str = ""
    registered: bool = False  # it registered itself (else it was given by address): forgotten if dead long
    dead_since: float | None = None  # monotonic time of its last death (None while alive)
    removed: bool = False  # forgotten: no longer in the pool
    streaming: bool = False  # decode: the router's token stream from it is open (dispatch sets it)
    prefill_stream: bool = True  # prefill: it answers PrefillStream (False once it said UNIMPLEMENTED: Prefill)
    slow_polls: int = 0  # polls in a row that timed out

    def __post_init__(self) -> None:
        self.kind = self.kind or self.role

    def connect(self, tls: TlsConfig, token: str | None) -> None:
        self.channel = cluster_channel(self.address, tls)
        stub_cls = worker_pb2_grpc.PrefillWorkerStub if self.role == "prefill" else worker_pb2_grpc.DecodeWorkerStub
        self.stub = AuthorizedStub(stub_cls(self.channel), token)

    # --- the router's view of a decode worker: its last Stats less what was reserved since --------------
    @property
    def free_pages(self) -> int:
        return max(0, self.stats.free_pages - self.held_pages - sum(pages for _, pages in self.confirmed))

    @property
    def free_slots(self) -> int:
        return max(0, self.stats.free_slots - self.held_slots - len(self.confirmed) + len(self.freed))

    def known_full(self) -> bool:
        """Its Stats and what we reserved and ended there since say that no slot is free (room comes back with a
        request that ends, a Release that answers, or the next Stats)."""
        return self.stats_at > 0 and self.stats.num_slots > 0 and self.free_slots == 0

    @property
    def num_pages(self) -> int:
        return self.stats.num_pages

    @property
    def num_slots(self) -> int:
        return self.stats.num_slots

    def hold(self, pages: int) -> None:
        """A Reserve of about this many pages is on its way here: count it before the worker answers."""
        self.held_pages += pages
        self.held_slots += 1

    def unhold(self, pages: int, granted: int | None = None) -> None:
        """The Reserve answered: refused (granted None) or granted that many pages, counted until a Stats
        asked for after now comes back."""
        self.held_pages -= pages
        self.held_slots -= 1
        if granted is not None:
            self.confirmed.append((time.monotonic(), granted))

    def slot_freed(self) -> None:
        """A request of ours ended here (the worker ended it, or our Release answered): its slot is free again,
        counted until a Stats asked for after now comes back. (One the Stats already counted is counted twice
        until then: a Reserve too many, refused; never one too few.)"""
        self.freed.append(time.monotonic())

    def seen(self, stats: worker_pb2.StatsResponse, asked_at: float) -> None:
        """A Stats asked for at asked_at: it includes every reservation confirmed, and every slot freed, before
        then."""
        self.stats, self.stats_at = stats, time.monotonic()
        self.cached = frozenset(stats.prefix_cache.hashes)
        while self.confirmed and self.confirmed[0][0] < asked_at:
            self.confirmed.popleft()
        while self.freed and self.freed[0] < asked_at:
            self.freed.popleft()

    def mark_dead(self, why: str) -> None:
        if self.alive:
            log.warning("%s worker %s is unreachable: %s", self.role, self.address, why)
        if self.alive or self.dead_since is None:
            self.dead_since = time.monotonic()
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
                 tls: TlsConfig | None = None, page_size: int = 128, forget_after_s: float = 60.0,
                 worker_wait_s: float = 30.0):
        """fingerprint: the model fingerprint every worker must run ("" checks nothing and refuses every
        registration); token and tls: how to call the workers (sparsepd/cluster_token.py, sparsepd/tls.py)."""
        self.placement = Placement(page_size)
        self.forget_after_s, self.worker_wait_s = forget_after_s, worker_wait_s
        self.down_since: dict[str, float] = {}  # role → when its last live worker was lost
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
            for w in handles:
                w.registered = True
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
        await self._forget_dead()
        self.changed.set()

    async def _forget_dead(self) -> None:
        """Registered workers dead for forget_after_s, with nothing of ours on them (no open token stream, no
        batch), leave the tables (one that comes back registers anew); workers given by address stay, polled
        until they answer again."""
        now = time.monotonic()
        gone = [w for w in self.all if w.registered and not w.alive and w.dead_since is not None
                and now - w.dead_since > self.forget_after_s and not w.streaming and not w.inflight]
        for w in gone:
            (self.prefill if w.role == "prefill" else self.decode).remove(w)
            w.removed = True
            log.warning("forgot %s worker %s: dead for %.0f s (%s)", w.role, w.address, now - w.dead_since,
                        w.last_error)
            if w.channel is not None:
                await w.channel.close()

    async def _poll(self, w: WorkerHandle) -> None:
        try:
            health = await w.stub.Health(worker_pb2.HealthRequest(), timeout=self.rpc_timeout_s)
            asked_at = time.monotonic()
            stats = await w.stub.Stats(worker_pb2.StatsRequest(), timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            w.slow_polls = w.slow_polls + 1 if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else 0
            if not 0 < w.slow_polls < SLOW_POLLS_DEAD:  # refused at once, or too slow too often: dead
                w.mark_dead(f"{exc.code().name}: {exc.details()}")
            return
        w.slow_polls = 0
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
        w.seen(stats, asked_at)
        w.alive, w.last_error, w.dead_since = True, "", None

    def out_of_service(self, role: str) -> str | None:
        """Why work that needs a `role` worker cannot wait for one, or None: one is alive, or the last one
        alive was lost less than worker_wait_s ago (a restart may bring it back, even once forgotten)."""
        workers = self.prefill if role == "prefill" else self.decode
        if any(w.alive for w in workers):
            self.down_since.pop(role, None)
            return None
        now = time.monotonic()
        since = self.down_since.get(role)
        if since is None and workers:  # listed, none alive: the wait starts
            since = self.down_since[role] = now
        if since is not None and now - since < self.worker_wait_s:
            return None
        errors = "; ".join(f"{w.address}: {w.last_error or 'not reachable yet'}" for w in workers)
        waited = f" for {now - since:.0f} s" if since is not None else ""
        return f"no {role} worker is alive{waited} ({errors})"

    def pick_prefill(self) -> WorkerHandle | None:
        """The live prefill worker to send the next batch to (router/placement.py)."""
        return self.placement.prefill(self.prefill)

    def decode_order(self, num_tokens: int) -> list[WorkerHandle]:
        """Live decode workers in the order to try for a request of num_tokens (router/placement.py)."""
        return self.placement.decode(self.decode, num_tokens)
