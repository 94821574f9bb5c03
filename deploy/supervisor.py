"""Keep a deployment's processes running (`sparsepd serve`): start each child, and start it again when it
exits, until asked to stop.

A child that exits (or dies before its ready line) is started again after a backoff that doubles with each
recent death (`backoff_s`, at most `max_backoff_s`); each death is logged with the child's exit code and last
lines and counted (`sparsepd_serve_restarts_total{child}` on the supervisor's Prometheus registry). A child
that dies more than `max_restarts` times within `window_s` seconds is given up on: `watch` returns non-zero
with a message naming it, how often it died and why, and the caller stops everything. The others keep
running while one restarts; reconnecting them is theirs to do (workers register with the router again,
sparsepd/registration.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from pydantic import BaseModel, ConfigDict, Field

from sparsepd.deploy.launch import Child, LaunchError, stop

# launch(on_spawn) starts the child, calls on_spawn(child) as soon as its process exists (so that a stop during
# the wait for its ready line can reach it), and returns it once ready; raises LaunchError if it is not.
Launch = Callable[[Callable[[Child], None]], Child]


class RestartPolicy(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_restarts: int = Field(5, ge=0, description="restarts of one child within window_s before giving up")
    window_s: float = Field(300.0, gt=0)
    backoff_s: float = Field(1.0, ge=0, description="wait before the first restart; doubles with each recent death")
    max_backoff_s: float = Field(30.0, ge=0)

    def delay_s(self, recent_deaths: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** max(0, recent_deaths - 1))


class GaveUp(Exception):
    """A child died more often than the restart policy allows."""


@dataclass(eq=False)
class Supervised:
    name: str
    launch: Launch
    child: Child | None = None
    deaths: deque = field(default_factory=deque)  # monotonic times of its deaths within the window
    restarting: bool = False

    def last_words(self, lines: int = 15) -> str:
        return "\n".join(list(self.child.log_tail)[-lines:]) if self.child is not None else ""


class Supervisor:
    def __init__(self, policy: RestartPolicy, say: Callable[[str], None]):
        self.policy, self.say = policy, say
        self.entries: list[Supervised] = []
        self.failure: str | None = None  # why it gave up
        self.changed = asyncio.Event()  # a restart finished or failed
        self.stopping = False
        self.registry = CollectorRegistry()
        self.restarts = Counter("restarts", "Children started again after they exited", ["child"],
                                namespace="sparsepd_serve", registry=self.registry)
        self.up = Gauge("child_up", "1 while the child runs", ["child"], namespace="sparsepd_serve",
                        registry=self.registry)
        self.metrics_server = None

    def serve_metrics(self, host: str, port: int) -> int:
        """Start the supervisor's Prometheus endpoint (/metrics); return its port."""
        self.metrics_server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self.metrics_server.server_port

    @property
    def children(self) -> list[Child]:
        return [e.child for e in self.entries if e.child is not None]

    def find(self, name: str) -> Supervised:
        return next(e for e in self.entries if e.name == name)

    # --- starting ---------------------------------------------------------------------------------------
    async def start(self, name: str, launch: Launch) -> Child:
        """Start a child and wait until it is ready, starting it again (under the policy) if it dies first;
        raises GaveUp when the policy is exhausted."""
        entry = Supervised(name, launch)
        self.entries.append(entry)
        await self._launch(entry)
        return entry.child

    async def _launch(self, entry: Supervised) -> None:
        def spawned(child: Child) -> None:
            entry.child = child
            if self.stopping:  # stop_all ran before the process existed: it is this thread's to stop
                stop(child)

        while True:
            try:
                child = await asyncio.to_thread(entry.launch, spawned)
            except LaunchError as exc:
                if self.stopping:
                    raise GaveUp(f"{entry.name} was stopped while starting") from None
                await asyncio.sleep(self._died(entry, exc.reason, exc.last_lines))
                continue
            entry.child = child
            self.up.labels(entry.name).set(1)
            return

    def _died(self, entry: Supervised, why: str, last_lines: str = "") -> float:
        """Count a death (why: what happened; last_lines: the child's); the backoff before its next start, or
        raise GaveUp."""
        self.up.labels(entry.name).set(0)
        now = time.monotonic()
        entry.deaths.append(now)
        while entry.deaths and entry.deaths[0] < now - self.policy.window_s:
            entry.deaths.popleft()
        n, tail = len(entry.deaths), f" Its last lines:\n{last_lines}" if last_lines else ""
        if n > self.policy.max_restarts:
            raise GaveUp(f"{entry.name} died {n} times within {self.policy.window_s:g} s (at most "
                         f"{self.policy.max_restarts} restarts allowed there): giving up. The last time: {why}.{tail}")
        delay = self.policy.delay_s(n)
        self.restarts.labels(entry.name).inc()
        self.say(f"error: {why}; restarting it in {delay:.1f} s (restart {n} of at most {self.policy.max_restarts} "
                 f"within {self.policy.window_s:g} s).{tail}")
        return delay

    # --- watching ---------------------------------------------------------------------------------------
    async def watch(self, stop_event: asyncio.Event, poll_s: float = 0.2) -> int:
        """Restart children that exit until stop_event is set (→ 0) or a child is given up on (→ 1)."""
        tasks: set[asyncio.Task] = set()
        try:
            while not stop_event.is_set() and self.failure is None:
                for entry in self.entries:
                    if entry.restarting or entry.child is None or entry.child.alive():
                        continue
                    entry.restarting = True
                    task = asyncio.create_task(self._restart(entry))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                try:
                    await asyncio.wait_for(stop_event.wait(), poll_s)
                except TimeoutError:
                    pass
        finally:
            self.stopping = True
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.failure is not None:
            self.say(f"error: {self.failure}")
            return 1
        return 0

    async def _restart(self, entry: Supervised) -> None:
        child = entry.child
        why = f"{entry.name} (pid {child.pid}) exited with code {child.proc.returncode}"
        try:
            await asyncio.sleep(self._died(entry, why, entry.last_words()))
            await self._launch(entry)
            self.say(f"{entry.name} is back (pid {entry.child.pid})")
        except GaveUp as exc:
            self.failure = self.failure or str(exc)
        finally:
            entry.restarting = False

    def stop_all(self, order: list[str], timeout_s: float) -> None:
        """Stop every child by pid, those named in `order` first in that order, then the rest."""
        self.stopping = True
        entries = sorted(self.entries, key=lambda e: order.index(e.name) if e.name in order else len(order))
        for entry in entries:
            if entry.child is not None:
                code = stop(entry.child, timeout_s=timeout_s)
                self.say(f"stopped {entry.name} (exit code {code})")
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
