"""One multi-turn run: conversations (see `conversation.py`) wait in a ready queue, first turns in
conversation order; requests start at the run's arrival rate, each taking the conversation at the queue's
head, and a conversation rejoins the queue's tail when its turn completes. So a conversation's next turn is
sent only after its previous one completed, and between arrivals conversations interleave as they would
in a chat service. At most `concurrency` requests are in flight; no request starts after `max_seconds`, and
those still running `drain_seconds` later are cut.

The gaps between arrivals are the single-turn workload's (exponential for a Poisson rate, 0 for `inf`). A
gap is counted from the previous request's start: when no conversation is ready (all are waiting for a
turn) or the concurrency limit is reached, the next request starts as soon as one is, and later arrivals
do not catch up in a burst.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sparsepd.loadtest.client import generate_request, send
from sparsepd.loadtest.conversation import CONTEXT, ENDINGS, FAILED, TIME, Conversation, ConversationPlan
from sparsepd.loadtest.metrics import OK, RequestRecord
from sparsepd.loadtest.runner import PointSettings, Progress
from sparsepd.loadtest.workload import Prompt
from sparsepd.proto import sglang_scheduler_pb2_grpc as pb_grpc

# called after every turn that ended (not one cut by the time bound): conversation, turn, prompt ids, record
TurnHook = Callable[[int, int, tuple[int, ...], RequestRecord], None]


@dataclass
class MultiTurnResult:
    records: list[RequestRecord]
    conversations: list[Conversation]
    turns: int
    duration_s: float

    def not_sent(self, ending: str) -> int:
        """Turns never sent by the conversations that stopped for `ending` (TIME: the time bound's)."""
        return sum(self.turns - c.sent for c in self.conversations if c.ended == ending)

    def summary(self) -> dict:
        """How the conversations ended, and the turns each kind of ending kept from being sent."""
        ended = Counter(c.ended for c in self.conversations)
        return {"count": len(self.conversations), "ended": {e: ended.get(e, 0) for e in ENDINGS},
                "turns_not_sent": {e: self.not_sent(e) for e in (CONTEXT, FAILED, TIME)},
                "context_stop_turns": dict(sorted(Counter(str(c.sent + 1) for c in self.conversations
                                                          if c.ended == CONTEXT).items()))}


async def run_conversations(stub: pb_grpc.SglangSchedulerStub, plan: ConversationPlan, gaps_s: np.ndarray,
                            settings: PointSettings, progress: Progress,
                            on_turn: TurnHook | None = None) -> MultiTurnResult:
    """Run every conversation of `plan` to its end (see the module docstring); `gaps_s[i]` is the gap before
    the i-th request (one per possible request; `gaps_s[0]` is ignored)."""
    conversations = [plan.start(i) for i in range(plan.conversations)]
    ready: asyncio.Queue[Conversation | None] = asyncio.Queue()
    for conversation in conversations:
        ready.put_nowait(conversation)
    live = len(conversations)
    records: list[RequestRecord] = []
    limit = asyncio.Semaphore(settings.concurrency or len(conversations))
    start = time.perf_counter()
    deadline = start + settings.max_seconds

    async def one(conversation: Conversation, index: int) -> None:
        nonlocal live
        prompt, turn = conversation.prompt, conversation.turn
        request = generate_request(Prompt(prompt, None, conversation.output_len),
                                   f"{settings.request_prefix}-{conversation.index}-t{turn}", settings.temperature,
                                   settings.seed + index, settings.stop_token_ids)
        conversation.sent += 1
        requeued = False
        try:
            try:
                record = await send(stub, request, settings.request_timeout_s, records, conversation.index, turn)
            finally:
                limit.release()
            progress.finished(record)
            if on_turn is not None:
                on_turn(conversation.index, turn, prompt, record)
            if record.status == OK:
                plan.advance(conversation, record.output_ids)
            else:
                conversation.ended = FAILED
            if conversation.ended is None:
                ready.put_nowait(conversation)
                requeued = True
        finally:  # also when cut, or when something raised: a conversation that is not requeued is over
            if not requeued:
                live -= 1
                if live == 0:
                    ready.put_nowait(None)  # wakes the dispatcher: nothing is left to send

    ticker = asyncio.create_task(progress.tick())
    tasks: list[asyncio.Task] = []
    try:
        next_at = start
        while len(tasks) < len(gaps_s):
            if len(tasks):
                next_at += float(gaps_s[len(tasks)])
            if next_at >= deadline:
                break
            await asyncio.sleep(max(next_at - time.perf_counter(), 0.0))
            conversation = await _next_ready(ready, limit, deadline)
            if conversation is None:
                break
            tasks.append(asyncio.create_task(one(conversation, len(tasks))))
            next_at = max(next_at, time.perf_counter())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(deadline + settings.drain_seconds - time.perf_counter(),
                                                               0.0))
            for task in pending:
                task.cancel()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            failures = [o for o in outcomes if isinstance(o, Exception)]  # not CancelledError: a cut turn
            if failures:
                raise failures[0]
    finally:
        ticker.cancel()
        progress.clear()
    for conversation in conversations:
        conversation.ended = conversation.ended or TIME
    end = max((r.end_s for r in records), default=time.perf_counter())
    return MultiTurnResult(records, conversations, plan.turns, end - start)


async def _next_ready(ready: asyncio.Queue, limit: asyncio.Semaphore, deadline: float) -> Conversation | None:
    """A free slot under the concurrency limit, then the conversation at the queue's head; None when the
    deadline passes first or no conversation is left (the slot is then given back)."""
    try:
        await asyncio.wait_for(limit.acquire(), max(deadline - time.perf_counter(), 0.0))
    except TimeoutError:
        return None
    try:
        conversation = await asyncio.wait_for(ready.get(), max(deadline - time.perf_counter(), 0.0))
    except TimeoutError:
        conversation = None
    if conversation is None:
        limit.release()
    return conversation
