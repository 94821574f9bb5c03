"""The decode worker's work per output token, counted rather than timed: the loop hands its listeners one list per
step (the engine's outputs as they are) and makes no Python call per token; the token stream sends one StepBatch
per step with an event for every token, and when it falls behind, one message for what is queued."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import threading
from pathlib import Path

from sparsepd.decode_worker.service import DecodeService
from sparsepd.decode_worker.worker import DecodeWorker
from sparsepd.engine.request import StepOutput
from sparsepd.proto import worker_pb2


class StepEngine:
    """What DecodeWorker.run reads of an engine, stepping `batch` running requests `steps` times (the outputs are
    built once: the engine's own cost is bench/bench_host.py's business)."""

    has_running = has_work = True

    def __init__(self, batch: int, steps: int, stop: threading.Event):
        self.outputs = [StepOutput(f"r{i}", 32 + i, None) for i in range(batch)]
        self.steps, self.stop, self.taken = steps, stop, 0

    def step(self, lock=None) -> list[StepOutput]:
        self.taken += 1
        if self.taken == self.steps:
            self.stop.set()
        return self.outputs


def loop_calls(batch: int, steps: int) -> tuple[int, list[tuple[int, list]]]:
    """Python and C calls the loop makes over `steps` steps of `batch` tokens (sys.setprofile, this thread), and
    what its listener got."""
    worker = DecodeWorker(engine=None)
    worker.engine = StepEngine(batch, steps, worker.stop_event)
    got: list[tuple[int, list]] = []
    worker.listeners.append(lambda step, updates: got.append((step, updates)))
    return _bench_host().count_calls(worker.run), got


def _bench_host():
    """bench/bench_host.py as a module: its call counter (sys.setprofile) is the one the host benchmark uses."""
    if "bench_host" in sys.modules:  # (tests/engine/test_host_cost.py loads it the same way)
        return sys.modules["bench_host"]
    path = Path(__file__).resolve().parents[2] / "bench" / "bench_host.py"
    spec = importlib.util.spec_from_file_location("bench_host", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_loop_publishes_each_step_once_and_calls_nothing_per_token():
    steps = 20
    small, got_small = loop_calls(8, steps)
    large, got_large = loop_calls(256, steps)
    for batch, got in ((8, got_small), (256, got_large)):
        assert [step for step, _ in got] == list(range(1, steps + 1))  # one publication per step
        assert all(len(updates) == batch and all(type(u) is StepOutput for u in updates) for _, updates in got)
    # 248 more tokens a step, and (up to a call or two a step) no more calls: nothing is done per token
    assert (large - small) / steps <= 2, (small / steps, large / steps)


def test_the_token_stream_sends_one_message_per_step_and_one_for_a_backlog():
    worker = DecodeWorker(engine=None)
    service = DecodeService(worker, "tcp://127.0.0.1:1", "fp")
    outputs = [StepOutput(f"r{i}", 32 + i, None) for i in range(64)]

    async def scenario() -> list[worker_pb2.StepBatch]:
        stream = service.StreamTokens(worker_pb2.StreamRequest(), None)
        first = asyncio.ensure_future(anext(stream))
        while not worker.listeners:
            await asyncio.sleep(0)
        messages = []
        for step in (1, 2, 3):  # the stream keeps up: a message a step
            worker.step_count = step
            worker._publish(outputs)
            messages.append(await (first if step == 1 else anext(stream)))
        for step in (4, 5, 6):  # it fell behind: what is queued goes in one message, in order
            worker.step_count = step
            worker._publish(outputs)
        messages.append(await anext(stream))
        await stream.aclose()
        return messages

    messages = asyncio.run(scenario())
    assert [m.step for m in messages] == [1, 2, 3, 6]
    assert [len(m.events) for m in messages] == [64, 64, 64, 192]
    assert [e.token_ids[0] for e in messages[3].events] == [32 + i for i in range(64)] * 3
    assert not worker.listeners
