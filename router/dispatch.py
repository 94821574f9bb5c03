"""Dispatch: from an admitted request to tokens on its stream, through one prefill and one decode worker.

    admit (bounded: `waiting()` below max_queue) → pick P (the one whose prefix cache holds the head's prompt,
    else fewest queued tokens) → batch (token budget, short wait; requests another P's cache holds wait for
    that P's batch)
    → per request pick D (room, then least loaded, router/placement.py) and Reserve there
    → Prefill(batch with tickets) on P
    → first token from P → the rest from D's token stream → end → release what is still held

Every flow ends exactly once (`_end`): finished, aborted, failed or cancelled. Ending releases the
decode reservation (unless the decode worker ended the request itself) and cancels a prefill in
flight, so pages and slots go back on both workers whatever happened. A flow whose Reserve finds no
room anywhere goes back to the head of the queue until a request ends or a poll sees free pages; it
fails with RESOURCE_EXHAUSTED only when no request of ours holds pages (it can never fit).

The admission bound: a new request is refused RESOURCE_EXHAUSTED while `waiting()` (admitted and not yet
sent to a prefill worker: queued, or in a batch reserving decode pages) is at max_queue. A request put back at
the head for want of room was counted all along, so with no worker lost the router never holds more than
max_queue waiting requests; one moved off a lost worker goes back to the head whatever the count (it was
admitted; failing it would fail an accepted request), so then the count can pass the cap by the requests
moved, and new ones are refused until it is below again.

Lost workers: a flow whose decode worker dies (its token stream breaks) or whose prefill worker dies with
its batch is moved (`_migrate`): what it still holds is released, and it goes back to the head of the
queue to be prefilled again, prompt + the tokens it already produced, and continued on another decode
worker; the client's stream goes on from the next token (the workers resume the request's random stream
at that position, so greedy and seeded requests produce what they would have). At most max_migrations
moves, then UNAVAILABLE naming the cause. While no worker of a role is alive, work waits for one up to the
pool's worker_wait_s (a supervised worker restarts) before failing UNAVAILABLE.

n > 1: a request's choices are a group of flows queued as one. Each choice reserves its own decode slot (all
or none), the prefill worker prefills once and ships one state per choice (`PrefillFork`), and the choices
then stream on their own; an abort or a failure of one ends the group.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

import grpc

from sparsepd.prefix_hash import prefix_hashes
from sparsepd.proto import worker_pb2
from sparsepd.router.flow import Flow, Outcome, TokenLogprob, worker_error_status
from sparsepd.router.params import RequestSpec
from sparsepd.router.text import StopStrings
from sparsepd.router.workers import WorkerHandle, WorkerPool

log = logging.getLogger("sparsepd.router")


class Refused(Exception):
    """A request the router will not take now (a gRPC status and a message)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class Dispatcher:
    def __init__(self, pool: WorkerPool, tokenizer=None, metrics=None, max_queue: int = 256,
                 batch_tokens: int = 2048, batch_wait_s: float = 0.005, reserve_ttl_s: float = 60.0,
                 prefill_timeout_s: float = 300.0, batches_per_prefill: int = 2, max_migrations: int = 3):
        self.pool, self.tokenizer, self.metrics = pool, tokenizer, metrics
        self.max_queue, self.batch_tokens, self.batch_wait_s = max_queue, batch_tokens, batch_wait_s
        self.reserve_ttl_s, self.prefill_timeout_s = reserve_ttl_s, prefill_timeout_s
        self.batches_per_prefill, self.max_migrations = batches_per_prefill, max_migrations
        self.flows: dict[str, Flow] = {}
        self.by_worker_id: dict[str, Flow] = {}  # the id each flow's current attempt has on the workers
        self.queue: deque[Flow] = deque()
        self.reserving: set[Flow] = set()  # taken from the queue into a batch, not yet sent to prefill
        self.wake = asyncio.Event()  # queue changed, a flow ended, or a worker freed up
        self.tasks: set[asyncio.Task] = set()
        self.draining = False
        self.blocked = False  # a Reserve found no room: wait for a request to end or a poll before retrying
        self.releasing = 0  # decode Release calls in flight: their pages come back when they answer
        self.room_freed = 0  # counts requests ended and Releases answered: a refusal older than one is stale

    # --- the public side ------------------------------------------------------------------------
    def submit(self, spec: RequestSpec) -> Flow:
        return self.submit_group(spec)[0]

    def submit_group(self, spec: RequestSpec) -> list[Flow]:
        """Admit a request: one flow, or one per choice when n > 1 (queued as one, prefilled once)."""
        if self.draining:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "the router is shutting down")
        specs = spec.choices()
        taken = [s.request_id for s in specs if s.request_id in self.flows or s.request_id in self.by_worker_id]
        if taken:
            raise Refused(grpc.StatusCode.ALREADY_EXISTS, f"request_id {taken[0]!r} is already in flight")
        for role in ("prefill", "decode"):
            why = self.pool.out_of_service(role)
            if why is not None:
                raise Refused(grpc.StatusCode.UNAVAILABLE, why)
        if self.waiting() >= self.max_queue:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the admission queue is full ({self.waiting()} of {self.max_queue} requests waiting); "
                          "retry later")
        flows = [Flow(s, StopStrings(self.tokenizer, list(s.stop)) if self.tokenizer is not None else None)
                 for s in specs]
        for flow in flows:
            flow.group = flows if len(flows) > 1 else None
            self.flows[flow.request_id] = self.by_worker_id[flow.worker_id] = flow
        self.queue.append(flows[0])
        self.wake.set()
        if self.metrics:
            self.metrics.admitted(len(spec.input_ids))
        return flows

    def waiting(self) -> int:
        """Requests admitted and not yet sent to a prefill worker: queued, or in a batch reserving decode pages.
        --max-queue bounds it for new requests; one put back at the head for want of decode room was counted all
        along, and only a request moved off a lost worker can take it past the cap (by one each)."""
        return len(self.queue) + len(self.reserving)

    def abort(self, request_id: str) -> bool:
        flow = self.flows.get(request_id)
        if flow is None:
            return False
        self._end(flow, Outcome("abort"))
        return True

    def cancel(self, flow: Flow) -> None:
        """The client went away (cancelled, deadline, disconnect)."""
        if not flow.ended:
            log.info("cancelled by the client", extra={"request_id": flow.request_id})
            self._end(flow, Outcome("abort", code=grpc.StatusCode.CANCELLED, message="cancelled by the client"))

    def abort_all(self, message: str) -> None:
        for flow in list(self.flows.values()):
            self._end(flow, Outcome("abort", code=grpc.StatusCode.UNAVAILABLE, message=message))

    # --- loops ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._spawn(self._batcher())
        self._spawn(self._poll_loop())
        for w in self.pool.decode:
            self._spawn(self._consume(w))
        self.pool.on_added.append(self._worker_added)

    def _worker_added(self, worker: WorkerHandle) -> None:
        if worker.role == "decode":
            self._spawn(self._consume(worker))
        self.wake.set()

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("router task failed", exc_info=task.exception())

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.pool.poll_s)
            await self.pool.poll_once()
            self.wake.set()

    async def _batcher(self) -> None:
        while True:
            if self.blocked:
                self.blocked = False
                self.wake.clear()
                await self.wake.wait()
                continue
            prefill = self.pool.pick_prefill()
            if not self.queue or prefill is None or prefill.inflight >= self.batches_per_prefill:
                why = self.pool.out_of_service("prefill") if self.queue and prefill is None else None
                for flow in list(self.queue) if why is not None else []:
                    self._end(flow, Outcome("abort", code=grpc.StatusCode.UNAVAILABLE, message=_after(flow, why)))
                self.wake.clear()
                await self.wake.wait()
                continue
            preferred = self._cached_prefill(self.queue[0])
            if preferred is not None and preferred.inflight < self.batches_per_prefill:
                prefill = preferred
            batch = await self._form_batch(lambda f: self._cached_prefill(f) in (None, prefill))
            if batch:
                self.pool.placement.chose(prefill)
                prefill.inflight += 1
                prefill.queued_tokens += sum(f.prefill_len for f in batch)
                self._spawn(self._run_batch(prefill, batch))

    def _cached_prefill(self, flow: Flow) -> WorkerHandle | None:
        """The prefill worker whose prefix cache makes it the place for this flow (router/placement.py)."""
        if flow.prefix_hashes is None:
            flow.prefix_hashes = prefix_hashes(flow.spec.input_ids, self.pool.placement.page_size)
        return self.pool.placement.cached_prefill(self.pool.prefill, flow.prefix_hashes, flow.prefill_len,
                                                  balance_tokens=4 * self.batch_tokens)

    def _note_cached(self, prefill: WorkerHandle, flow: Flow) -> None:
        """The prefill worker now holds the flow's prompt up to its last page boundary (engine/prefix_cache.py):
        count it before its next Stats says so, so the conversation's next turn finds it at once."""
        if not prefill.stats.prefix_cache.enabled or flow.prefix_hashes is None:
            return
        pages = (len(flow.spec.input_ids) - 1) // self.pool.placement.page_size
        if 0 < pages <= len(flow.prefix_hashes):
            prefill.cached = prefill.cached | {flow.prefix_hashes[pages - 1]}

    async def _form_batch(self, accept: Callable[[Flow], bool]) -> list[Flow]:
        """Take the queued flows `accept` takes (in order, up to the token budget), waiting at most batch_wait_s
        for more to arrive; the head is always taken (it chose the worker)."""
        batch, tokens = [], 0
        deadline = time.monotonic() + self.batch_wait_s
        while True:
            for flow in list(self.queue):
                if batch and tokens + flow.prefill_len > self.batch_tokens:
                    break
                if batch and not accept(flow):
                    continue  # another worker's cache holds its prefix: left for that worker's batch
                self.queue.remove(flow)
                self.reserving.add(flow)
                batch.append(flow)
                tokens += flow.prefill_len
            left = deadline - time.monotonic()
            if tokens >= self.batch_tokens or left <= 0 or (self.queue and batch):
                return batch
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), left)
            except TimeoutError:
                return batch

    # --- one batch ----------------------------------------------------------------------------------
    async def _run_batch(self, prefill: WorkerHandle, batch: list[Flow]) -> None:
        tokens = sum(f.prefill_len for f in batch)
        try:
            only = [prefill.pair] if prefill.pair is not None else None  # colocated: reserve on itself
            members = [[(m, m.attempt) for m in f.prefill_members] for f in batch]
            tickets = await asyncio.gather(*(self._reserve_members(f, only) for f in batch))
            sent = []
            for f, t, before in zip(batch, tickets, members, strict=True):
                moved = next((m for m, attempt in before if m.attempt != attempt), None)
                if moved is not None:  # its decode worker was lost while the rest reserved: all go alone
                    for m, attempt in before:
                        if m.attempt == attempt:
                            self._migrate(m, "decode", moved.lost)
                elif t is not None and not f.ended:
                    sent.append((f, t))
            if sent:
                await self._prefill(prefill, sent)
        finally:
            prefill.inflight -= 1
            prefill.queued_tokens -= tokens
            self.wake.set()

    async def _reserve_members(self, flow: Flow, only: list[WorkerHandle] | None) -> list[worker_pb2.Ticket] | None:
        """A ticket for the flow and each of its group (n > 1, first attempt), or None: all or nothing (a member
        that finds no room gives the others' pages back and the group waits or fails as one request)."""
        members = flow.prefill_members
        if len(members) == 1:
            ticket = await self._reserve(flow, only)
            return None if ticket is None else [ticket]
        asked_at = self.room_freed
        results = await asyncio.gather(*(self._reserve(m, only, on_no_room=False) for m in members))
        if all(isinstance(t, worker_pb2.Ticket) for t in results) and not flow.ended:
            return list(results)
        # Give the pages back, and wait until the decode workers have them: the group is reserved again from
        # scratch under the same ids, which a worker still holding them refuses ("already reserved").
        held = [m for m in members if m.reserved and not m.decode_done and m.decode is not None]
        for member in held:
            member.decode_done = True
            self.releasing += 1
        await asyncio.gather(*(self._release_on(m.decode, m.worker_id, holds_pages=True) for m in held))
        for member in members:
            member.reserved, member.decode_done, member.decode = False, False, None
        if not flow.ended:
            last = next((t for t in results if isinstance(t, str)), "")
            self._no_room(flow, last, asked_at + len(held))  # its own give-backs do not make the refusal stale
        return None

    async def _reserve(self, flow: Flow, only: list[WorkerHandle] | None = None,
                       on_no_room: bool = True) -> worker_pb2.Ticket | str | None:
        """A ticket for the flow on a decode worker with room; None if it ended. When no worker has room:
        on_no_room → wait or fail (`_no_room`) and None; else the last worker's answer (a str)."""
        spec, last = flow.spec, ""
        request = worker_pb2.ReserveRequest(request_id=flow.worker_id, prompt_len=len(spec.input_ids),
                                            sampling=spec.sampling, ttl_s=self.reserve_ttl_s)
        tokens = flow.prefill_len + 1  # what the state fills and its next token: decode workers grow pages on demand
        need = self.pool.placement.pages_for(tokens)
        asked_at = self.room_freed
        candidates = [w for w in only if w.alive] if only is not None else self.pool.decode_order(tokens)
        for worker in candidates:
            if flow.ended:
                return None
            worker.hold(need)  # counted at once: the next flow's choice sees it (router/placement.py)
            self.pool.placement.chose(worker)
            try:
                reply = await worker.stub.Reserve(request, timeout=self.pool.rpc_timeout_s * 5)
            except asyncio.CancelledError:
                worker.unhold(need)
                raise
            except grpc.aio.AioRpcError as exc:
                worker.unhold(need)
                last = f"{worker.address}: {exc.details()}"
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    continue
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    self._end(flow, Outcome("abort", code=exc.code(), message=f"decode worker {last}"))
                    return None
                worker.mark_dead(f"Reserve: {exc.code().name}: {exc.details()}")
                continue
            worker.unhold(need, granted=len(reply.ticket.page_ids))
            flow.decode, flow.reserved = worker, True
            if flow.ended:  # aborted while reserving: give the pages back now
                self._release(flow)
                return None
            return reply.ticket
        if flow.ended:
            return None
        if not on_no_room:
            return last
        self._no_room(flow, last, asked_at)
        return None

    def _no_room(self, flow: Flow, last: str, asked_at: int) -> None:
        """No decode worker could reserve for the flow (or its group): wait at the queue's head while other
        requests hold pages (or are being given some: Reserve calls in flight; or are giving them back: Release
        calls in flight) or while a decode worker may come back, else fail. A refusal sent before a request
        ended (asked_at: `room_freed` when the Reserve went out; replies and token streams arrive in any order)
        may be stale: the flow is retried at once."""
        if not any(w.alive for w in self.pool.decode):
            why = self.pool.out_of_service("decode")
            if why is not None:
                self._end(flow, Outcome("abort", code=grpc.StatusCode.UNAVAILABLE, message=_after(flow, why)))
            else:
                self._put_back(flow, for_room=True)
                self.blocked = True
        elif (self.releasing or self.room_freed != asked_at or any(f.reserved for f in self.flows.values())
              or any(w.held_slots for w in self.pool.decode)):
            self._put_back(flow, for_room=True)  # room comes back when another request ends or a Release answers
            self.blocked = self.room_freed == asked_at
        else:
            self._end(flow, Outcome("abort", code=grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    message=f"no decode worker can hold this request ({last})"))

    async def _prefill(self, prefill: WorkerHandle, sent: list[tuple[Flow, list[worker_pb2.Ticket]]]) -> None:
        now = time.monotonic()
        self.reserving.difference_update(f for f, _ in sent)
        members = [m for f, _ in sent for m in f.prefill_members]
        sent_ids = {f.worker_id: f for f in members}
        for flow in members:
            flow.prefill, flow.prefill_inflight = prefill, True
            flow.queue_ms = (now - flow.admitted_at) * 1e3
        batch = worker_pb2.PrefillBatch(requests=[_prefill_request(f, tickets) for f, tickets in sent])
        try:
            response = await prefill.stub.Prefill(batch, timeout=self.prefill_timeout_s)
        except grpc.aio.AioRpcError as exc:
            lost = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            if lost:
                prefill.mark_dead(f"Prefill: {exc.code().name}: {exc.details()}")
            why = f"prefill worker {prefill.address} failed: {exc.details()}"
            for worker_id, flow in sent_ids.items():
                if flow.worker_id != worker_id:  # moved meanwhile (its decode worker was lost)
                    continue
                flow.prefill_inflight = False
                if lost:
                    self._migrate(flow, "prefill", why)
                else:
                    self._end(flow, Outcome("abort", code=grpc.StatusCode.UNAVAILABLE, message=why))
            return
        for result in response.results:
            flow = sent_ids.get(result.request_id)
            if flow is not None and flow.worker_id == result.request_id:  # not a moved flow's old attempt
                self._on_prefill_result(prefill, flow, result)

    def _on_prefill_result(self, prefill: WorkerHandle, flow: Flow, r: worker_pb2.PrefillResult) -> None:
        flow.prefill_inflight = False
        if flow.ended:
            return
        if not r.ok:  # a failed transfer or a worker-side refusal: transient unless error_code names the request
            why = f"prefill worker {prefill.address}: {r.error}"
            if flow.decode is not None and not flow.decode.alive:  # the transfer failed with its decode worker
                self._migrate(flow, "decode", why)
            else:
                self._end(flow, Outcome("abort", code=worker_error_status(r.error_code), message=why))
            return
        flow.prefill_ms, flow.transfer_ms, flow.transfer_bytes = r.prefill_ms, r.transfer_ms, r.transfer_bytes
        if not flow.output_ids:  # (a moved request's usage stays its first prefill's)
            flow.cached_tokens = r.cached_tokens
            self._note_cached(prefill, flow)
        if r.transfer_bytes:
            prefill.transfers += 1
            prefill.transfer_bytes += r.transfer_bytes
            prefill.transfer_ms += r.transfer_ms
            if self.metrics:
                self.metrics.transfer(r.transfer_bytes, r.transfer_ms / 1e3)
        flow.first_known = True
        if r.HasField("prompt_logprobs"):
            flow.prompt_logprobs = r.prompt_logprobs
        if not r.first_token_in_stream:  # a colocated worker sends its first token on the token stream
            logprobs = [TokenLogprob(r.first_logprob, tuple(r.first_top_logprobs.token_ids),
                                     tuple(r.first_top_logprobs.logprobs), tuple(r.first_token_ids_logprobs.logprobs))
                        ] if flow.spec.logprobs else None
            self._deliver(flow, [r.first_token], r.finish_reason, logprobs)
        for event in flow.early:
            self._apply_decode_event(flow, event)
        flow.early.clear()

    # --- the decode workers' token streams ------------------------------------------------------------
    async def _consume(self, worker: WorkerHandle) -> None:
        while not worker.removed:
            if not worker.alive:
                self.pool.changed.clear()
                await self.pool.changed.wait()
                continue
            call = worker.stub.StreamTokens(worker_pb2.StreamRequest())
            worker.streaming = True
            try:
                async for step in call:
                    for event in step.events:
                        self._on_decode_event(worker, event)
                why = "its token stream ended"
            except grpc.aio.AioRpcError as exc:
                why = f"its token stream failed: {exc.code().name}: {exc.details()}"
            finally:
                worker.streaming = False
            worker.mark_dead(why)
            for flow in [f for f in self.flows.values() if f.decode is worker and f.reserved]:
                self._migrate(flow, "decode", f"decode worker {worker.address} went away: {why}")

    def _on_decode_event(self, worker: WorkerHandle, event: worker_pb2.TokenEvent) -> None:
        flow = self.by_worker_id.get(event.request_id)
        if flow is None or flow.decode is not worker or flow.ended:
            return
        if not flow.first_known:
            flow.early.append(event)
            return
        self._apply_decode_event(flow, event)

    def _apply_decode_event(self, flow: Flow, event: worker_pb2.TokenEvent) -> None:
        if flow.ended:
            return
        reason = event.finish_reason
        if reason in ("stop", "length", "abort", "error"):
            flow.decode_done = True
        if reason == "error":  # the state could not be admitted, or never came: transient as above
            self._end(flow, Outcome("abort", code=worker_error_status(event.error_code),
                                    message=f"decode worker {flow.decode.address}: {event.error}"))
        elif reason == "abort":
            self._end(flow, Outcome("abort"))
        else:
            if event.HasField("prompt_logprobs"):  # a colocated worker's, with the first token
                flow.prompt_logprobs = event.prompt_logprobs
            self._deliver(flow, list(event.token_ids), reason, _logprobs(event) if flow.spec.logprobs else None)

    # --- tokens and the end -----------------------------------------------------------------------------
    def _deliver(self, flow: Flow, token_ids: list[int], worker_finish: str,
                 logprobs: list[TokenLogprob] | None = None) -> None:
        if logprobs is not None and len(logprobs) != len(token_ids):
            self._end(flow, Outcome("abort", code=grpc.StatusCode.INTERNAL, message=(
                f"worker sent {len(logprobs)} log-probabilities for {len(token_ids)} tokens")))
            return
        problem = _prompt_logprobs_problem(flow) if token_ids and not flow.output_ids else None
        if problem is not None:
            self._end(flow, Outcome("abort", code=grpc.StatusCode.INTERNAL, message=problem))
            return
        if token_ids and not flow.output_ids:
            flow.ttft_ms = (time.monotonic() - flow.admitted_at) * 1e3
            if self.metrics:
                self.metrics.first_token(flow.ttft_ms / 1e3)
        new, outcome = flow.take(token_ids, logprobs)
        if outcome is None and worker_finish:
            outcome = flow.worker_outcome(worker_finish)
        now = time.monotonic()
        flow.first_token_at = flow.first_token_at or now
        flow.last_token_at = now
        if new:
            flow.events.put_nowait(("tokens", new))
            if self.metrics:
                self.metrics.generated(len(new))
        if outcome is not None:
            self._end(flow, outcome)

    def _end(self, flow: Flow, outcome: Outcome) -> None:
        if flow.ended:
            return
        flow.ended, flow.outcome = True, outcome
        self.room_freed += 1
        self.flows.pop(flow.request_id, None)
        self.by_worker_id.pop(flow.worker_id, None)
        if flow in self.queue:  # (not remove-and-catch: deque.remove's miss formats repr(flow), which is slow)
            self.queue.remove(flow)
        self.reserving.discard(flow)
        flow.events.put_nowait(("end", outcome))
        if outcome.code is not None and outcome.code != grpc.StatusCode.CANCELLED:
            log.warning("%s: %s", outcome.code.name, outcome.message, extra={"request_id": flow.request_id})
        self._release(flow)
        if self.metrics:
            self.metrics.ended(flow)
        if flow.group is not None and (outcome.code is not None or outcome.finish_reason == "abort"):
            for member in flow.group:  # n > 1 is one request: an abort or a failure of one ends them all
                self._end(member, outcome)
        self.wake.set()

    def _migrate(self, flow: Flow, cause: str, why: str) -> None:
        """Move a flow whose worker was lost (cause: "prefill" or "decode"): release what its attempt still
        holds, and queue it at the head to be prefilled again with the tokens it already produced; fail it
        once it was moved max_migrations times."""
        if flow.ended:
            return
        if flow.attempt >= self.max_migrations:  # (ending releases what it holds)
            self._end(flow, Outcome("abort", code=grpc.StatusCode.UNAVAILABLE, message=(
                f"{why}; not moved again: it was moved {flow.attempt} times already (--max-migrations)")))
            return
        self._release(flow)
        log.warning("moving the request to other workers after %d tokens: %s", len(flow.output_ids), why,
                    extra={"request_id": flow.request_id})
        self.by_worker_id.pop(flow.worker_id, None)
        flow.move(why)
        self.by_worker_id[flow.worker_id] = flow
        self._put_back(flow)
        self.blocked = False
        self.wake.set()
        if self.metrics:
            self.metrics.migrated(cause)

    def _put_back(self, flow: Flow, for_room: bool = False) -> None:
        """Queue an admitted flow again, at the head (it keeps its place, whatever the queue's length);
        for_room: it waits for decode room (else it was moved off a lost worker)."""
        self.reserving.discard(flow)
        self.queue.appendleft(flow)
        if for_room and self.metrics:
            self.metrics.put_back()

    def _release(self, flow: Flow) -> None:
        """Give back what the flow still holds: the decode reservation, a prefill in flight."""
        if flow.reserved and not flow.decode_done and flow.decode is not None:
            flow.decode_done = True
            self.releasing += 1  # counted now: the flow no longer holds its pages in our view, the worker still does
            self._spawn(self._release_on(flow.decode, flow.worker_id, holds_pages=True))
        if flow.prefill_inflight and flow.prefill is not None:
            self._spawn(self._release_on(flow.prefill, flow.worker_id))

    async def _release_on(self, worker: WorkerHandle, request_id: str, holds_pages: bool = False) -> None:
        if worker.removed:  # forgotten: its channel is closed (and it held nothing of ours)
            if holds_pages:
                self.releasing -= 1
            return
        try:
            await worker.stub.Release(worker_pb2.ReleaseRequest(request_id=request_id),
                                      timeout=self.pool.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.warning("Release on %s worker %s failed: %s", worker.role, worker.address,
                        exc.details(), extra={"request_id": request_id})
        finally:
            if holds_pages:
                self.releasing -= 1
                self.room_freed += 1
                self.wake.set()  # a request waiting for room may fit now


def _prefill_request(flow: Flow, tickets: list[worker_pb2.Ticket]) -> worker_pb2.PrefillRequest:
    """The flow's PrefillRequest; the rest of its group (n > 1) as forks with their own sampling and tickets; a
    moved flow's tokens so far (it resumes after them)."""
    forks = [worker_pb2.PrefillFork(request_id=m.worker_id, sampling=m.spec.sampling, ticket=t)
             for m, t in zip(flow.prefill_members[1:], tickets[1:], strict=True)]
    sampling = flow.spec.sampling
    if flow.attempt and flow.output_ids and sampling.HasField("logprob_start_len"):
        sampling = worker_pb2.SamplingParams()  # the prompt's log-probabilities went out with the first token
        sampling.CopyFrom(flow.spec.sampling)
        sampling.ClearField("logprob_start_len")
    return worker_pb2.PrefillRequest(request_id=flow.worker_id, input_ids=flow.spec.input_ids,
                                     sampling=sampling, ticket=tickets[0], forks=forks,
                                     output_ids=flow.output_ids if flow.attempt else [])


def _after(flow: Flow, why: str) -> str:
    """A failure's message, with why the flow was moved before when it was."""
    return f"{flow.lost}; then {why}" if flow.lost else why


def _logprobs(event: worker_pb2.TokenEvent) -> list[TokenLogprob]:
    """The log-probabilities of an event's tokens (their token-id values when the request named ids)."""
    ids = [tuple(x.logprobs) for x in event.token_ids_logprobs] or [()] * len(event.logprobs)
    tops = list(event.top_logprobs) or [worker_pb2.TopLogprobs()] * len(event.logprobs)
    return [TokenLogprob(lp, tuple(top.token_ids), tuple(top.logprobs), i)
            for lp, top, i in zip(event.logprobs, tops, ids, strict=False)]


def _prompt_logprobs_problem(flow: Flow) -> str | None:
    """Why the prompt log-probabilities a worker sent before the first token do not fit the request, if so."""
    spec, got = flow.spec, flow.prompt_logprobs
    if spec.logprob_start_len is None:
        return None
    want = len(spec.input_ids) - 1 - spec.logprob_start_len
    if got is None or got.start != spec.logprob_start_len or len(got.logprobs) != want:
        return (f"the worker's prompt log-probabilities do not fit the request: expected {want} values from "
                f"position {spec.logprob_start_len}, got "
                + ("none" if got is None else f"{len(got.logprobs)} from position {got.start}"))
    if (spec.top_logprobs and len(got.top_logprobs) != want) or (
            spec.token_ids_logprob and len(got.token_ids_logprobs) != want):
        return (f"the worker's prompt log-probabilities lack the top ones or the token ids' ({len(got.top_logprobs)} "
                f"and {len(got.token_ids_logprobs)} of {want})")
    return None
