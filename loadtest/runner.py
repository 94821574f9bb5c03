"""One load point: requests arrive on their schedule, at most `concurrency` run at once, none starts after
`max_seconds`, and those still running `drain_seconds` later are cut. A progress line on stderr."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass

import numpy as np

from sparsepd.loadtest.client import generate_request, send
from sparsepd.loadtest.metrics import CUT, OK, RequestRecord
from sparsepd.loadtest.workload import Prompt
from sparsepd.proto import sglang_scheduler_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class PointSettings:
    concurrency: int | None  # None = no limit
    max_seconds: float
    drain_seconds: float
    request_timeout_s: float
    temperature: float
    seed: int
    request_prefix: str
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class PointResult:
    records: list[RequestRecord]
    duration_s: float
    not_sent: int


class Progress:
    """`[c=4] |#######.......| 12/32 done, 1 failed, 3.2 s` on one line of stderr, redrawn in place (a terminal
    only; elsewhere nothing is drawn)."""

    WIDTH = 30

    def __init__(self, title: str, total: int, enabled: bool = True, stream=sys.stderr):
        self.title, self.total, self.stream = title, total, stream
        self.enabled = enabled and stream.isatty()
        self.started = time.perf_counter()
        self.done = self.failed = 0

    def finished(self, record: RequestRecord) -> None:
        self.done += 1
        self.failed += record.status not in (OK, CUT)
        self.draw()

    def draw(self) -> None:
        if not self.enabled:
            return
        filled = self.WIDTH * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        self.stream.write(f"\r[{self.title}] |{bar}| {self.done}/{self.total} done, {self.failed} failed, "
                          f"{time.perf_counter() - self.started:.1f} s ")
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * (self.WIDTH + len(self.title) + 60) + "\r")
            self.stream.flush()

    async def tick(self, every_s: float = 0.5) -> None:
        while True:
            await asyncio.sleep(every_s)
            self.draw()


async def run_point(stub: pb_grpc.SglangSchedulerStub, prompts: list[Prompt], arrivals_s: np.ndarray,
                    settings: PointSettings, progress: Progress) -> PointResult:
    records: list[RequestRecord] = []
    limit = asyncio.Semaphore(settings.concurrency or max(len(prompts), 1))
    start = time.perf_counter()
    deadline = start + settings.max_seconds

    async def one(index: int, prompt: Prompt) -> None:
        async with limit:
            if time.perf_counter() >= deadline:
                return
            request = generate_request(prompt, f"{settings.request_prefix}-{index}", settings.temperature,
                                       settings.seed + index, settings.stop_token_ids)
            progress.finished(await send(stub, request, settings.request_timeout_s, records))

    ticker = asyncio.create_task(progress.tick())
    tasks = []
    try:
        for index, (prompt, at_s) in enumerate(zip(prompts, arrivals_s, strict=True)):
            wait_s = min(start + at_s, deadline) - time.perf_counter()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            if time.perf_counter() >= deadline:
                break
            tasks.append(asyncio.create_task(one(index, prompt)))
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(deadline + settings.drain_seconds - time.perf_counter(),
                                                               0.0))
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        ticker.cancel()
        progress.clear()
    end = max((r.end_s for r in records), default=time.perf_counter())
    return PointResult(records, end - start, len(prompts) - len(records))


async def warm_up(stub: pb_grpc.SglangSchedulerStub, prompts: list[Prompt], timeout_s: float,
                  stop_token_ids: tuple[int, ...] = ()) -> list[RequestRecord]:
    """Send `prompts` at once and wait for them (first-use costs such as kernel compilation stay out of the
    points); the records are returned for the caller to check, not measured."""
    records: list[RequestRecord] = []
    await asyncio.gather(*(send(stub, generate_request(p, f"loadtest-warmup-{i}", 0.0, i, stop_token_ids), timeout_s,
                                records) for i, p in enumerate(prompts)))
    return records
