"""Dispatch: from an admitted request to tokens on its stream, through one prefill and one decode worker.

    admit (bounded queue) → pick P (the one whose prefix cache holds the head's prompt, else fewest queued
    tokens) → batch (token budget; a short wait for more only while P has a batch in flight; requests another
    P's cache holds wait for that P's batch) → per request pick D (room, then least loaded, router/placement.py)
    and Reserve there
    → PrefillStream(batch with tickets) on P (Prefill where P lacks it)
    → first token from P as soon as drawn → P's final result once D acknowledged the state → the rest from D's
    token stream → end → release what is still held

A flow's stage is one enum (router/stage.py: queued → reserving → reserved → prefilling → decoding → ended),
changed only through `Flow.to`, which refuses and logs a change its table does not allow. What a flow holds
follows from its stage, and leaving a stage releases what it held (router/reservations.py, which also keeps
the decode-room accounting); token delivery and the stop rules are router/delivery.py's.

Every flow ends exactly once (`_end`): finished, aborted, failed or cancelled. Ending releases the
decode reservation (unless the decode worker ended the request itself) and cancels a prefill in
flight, so pages and slots go back on both workers whatever happened. A flow whose Reserve finds no
room anywhere goes back to the head of the queue until a request ends or a poll sees free pages; it
fails with RESOURCE_EXHAUSTED only when no request of ours holds pages (it can never fit).

Lost workers: a flow whose decode worker dies (its token stream breaks) or whose prefill worker dies with
its batch is moved (`_migrate`): what it still holds is released, and it goes back to the head of the
queue to be prefilled again, prompt + the tokens it already produced, and continued on another decode
worker; the client's stream goes on from the next token (the workers resume the request's random stream
at that position, so greedy and seeded requests produce what they would have). At most max_migrations
moves, then UNAVAILABLE naming the cause. While no worker of a role is alive, work waits for one up to the
pool's worker_wait_s (a supervised worker restarts) before failing UNAVAILABLE.

n > 1: a request's choices are a group of flows queued as one. Each choice reserves its own decode slot (all
or none), the prefill worker prefills once and ships one state per choice (`PrefillFork`), and the choices
then stream on their own; an abort or a failure of one ends the group. The request's own id names the group
(`requests`) until its last choice ends: an Abort or a client cancel after one choice has finished ends the
others still running, and the id stays taken until then.
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
from sparsepd.proto.transfer import REQUEST_ID_RULE, request_id_ok
from sparsepd.router.delivery import deliver, event_logprobs, first_token_logprobs
from sparsepd.router.flow import Flow, Outcome, TokenLogprob, worker_error_status
from sparsepd.router.params import RequestSpec
from sparsepd.router.reservations import Granted, Invalid, NoRoom, Reservations
from sparsepd.router.stage import Stage
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
                 prefill_timeout_s: float = 300.0, batches_per_prefill: int = 2, max_migrations: int = 3,
                 stream_interval: int = 1, batch_wait_idle: bool = False):
        """stream_interval: tokens a flow hands its stream at a time after the first (router/delivery.py).
        batch_wait_idle: wait batch_wait_s for more requests also when the prefill worker has no batch in flight
        (by default an idle worker gets the queue at once)."""
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be ≥ 1, got {stream_interval}")
        self.pool, self.tokenizer, self.metrics = pool, tokenizer, metrics
        self.stream_interval = stream_interval
        self.max_queue, self.batch_tokens, self.batch_wait_s = max_queue, batch_tokens, batch_wait_s
        self.batch_wait_idle = batch_wait_idle
        self.prefill_timeout_s = prefill_timeout_s
        self.batches_per_prefill, self.max_migrations = batches_per_prefill, max_migrations
        self.flows: dict[str, Flow] = {}  # by each choice's request id (`<id>#<i>` for i > 0)
        self.requests: dict[str, list[Flow]] = {}  # by the request's own id: all its choices, until the last ends
        self.by_worker_id: dict[str, Flow] = {}  # the id each flow's current attempt has on the workers
        self.queue: deque[Flow] = deque()
        self.wake = asyncio.Event()  # queue changed, a flow ended, or a worker freed up
        self.tasks: set[asyncio.Task] = set()
        self.draining = False
        self.reservations = Reservations(pool, reserve_ttl_s, self._spawn, self.wake)

    # --- the public side ------------------------------------------------------------------------
    def submit(self, spec: RequestSpec) -> Flow:
        return self.submit_group(spec)[0]

    def submit_group(self, spec: RequestSpec) -> list[Flow]:
        """Admit a request: one flow, or one per choice when n > 1 (queued as one, prefilled once)."""
        specs = spec.choices()
        self._check_request_id(specs)
        if self.draining:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "the router is shutting down")
        taken = [s.request_id for s in specs
                 if s.request_id in self.flows or s.request_id in self.by_worker_id or s.request_id in self.requests]
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
        flows = [Flow(s, StopStrings(self.tokenizer, list(s.stop)) if self.tokenizer is not None else None,
                      stream_interval=self.stream_interval) for s in specs]
        for flow in flows:
            flow.group = flows if len(flows) > 1 else None
            self.flows[flow.request_id] = self.by_worker_id[flow.worker_id] = flow
        self.requests[spec.request_id] = flows
        self.queue.append(flows[0])
        self.wake.set()
        if self.metrics:
            self.metrics.admitted(len(spec.input_ids))
        return flows

    def _check_request_id(self, specs: list[RequestSpec]) -> None:
        """Refuse (INVALID_ARGUMENT) a request id the P→D transfer header cannot carry, before anything is reserved:
        the longest id its flows may have on the workers (the last choice's `<id>#<i>`, moved `max_migrations`
        times: `@<n>`, Flow.worker_id) must pass the header's own check (proto/transfer.py `request_id_ok`)."""
        longest = specs[-1].request_id + (f"@{self.max_migrations}" if self.max_migrations else "")
        if request_id_ok(longest):
            return
        rid, suffix = specs[0].request_id, longest[len(specs[0].request_id):]
        added = f" including the suffix {suffix!r} the workers may know it by (choices, moves)" if suffix else ""
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                      f"request_id {rid[:64]!r}{'…' if len(rid) > 64 else ''} of {len(rid)} characters: the "
                      f"prefill→decode transfer carries ids of {REQUEST_ID_RULE}{added}")

    def abort(self, request_id: str) -> bool:
        """Abort the request (every choice still running) by its own id, or by one choice's `<id>#<i>`."""
        group = self.requests.get(request_id)
        flow = self.flows.get(request_id) if group is None else next((f for f in group if not f.ended), None)
        if flow is None:
            return False
        self._end(flow, Outcome("abort"))  # (and the rest of its group)
        return True

    def cancel(self, flow: Flow) -> None:
        """The client of the flow's request went away (cancelled, deadline, disconnect): every choice still running
        ends, whichever ended before."""
        live = next((f for f in flow.members if not f.ended), None)
        if live is not None:
            log.info("cancelled by the client", extra={"request_id": live.request_id})
            self._end(live, Outcome("abort", code=grpc.StatusCode.CANCELLED, message="cancelled by the client"))

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
            if self.reservations.blocked:
                self.reservations.blocked = False
                self.wake.clear()
                await self.wake.wait()
                continue
            prefill = self.pool.pick_prefill()
            if not self.queue or prefill is None or prefill.inflight >= self.batches_per_prefill:
                why = self.pool.out_of_service("prefill") if self.queue and prefill is None else None
                for flow in list(self.queue) if why is not None else []:
                    self._end(flow, Outcome("abort", code=grpc.StatusCode.UNAVAILABLE,
                                            message=flow.failure_message(why)))
                self.wake.clear()
                await self.wake.wait()
                continue
            preferred = self._cached_prefill(self.queue[0])
            if preferred is not None and preferred.inflight < self.batches_per_prefill:
                prefill = preferred
            # an idle worker gets the queue at once: waiting for company only pays while it is busy with a batch
            # (5 ms of every request's TTFT at low load otherwise, bench/RESULTS.md 2026-12-07)
            wait_s = self.batch_wait_s if prefill.inflight or self.batch_wait_idle else 0.0
            batch = await self._form_batch(lambda f, chosen=prefill: self._cached_prefill(f) in (None, chosen), wait_s)
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
        """The prefill worker now holds a restore point at every page boundary of the flow's prompt up to the last
        one at or before its end (engine/prefix_cache.py): count them before its next Stats says so, so that the
        next turn of a conversation, or another request sharing a part of the prompt, finds them at once."""
        if not prefill.stats.prefix_cache.enabled or flow.prefix_hashes is None:
            return
        pages = len(flow.spec.input_ids) // self.pool.placement.page_size
        if pages > 0:
            prefill.cached = prefill.cached | set(flow.prefix_hashes[:pages])

    async def _form_batch(self, accept: Callable[[Flow], bool], wait_s: float) -> list[Flow]:
        """Take the queued flows `accept` takes (in order, up to the token budget), waiting at most wait_s for more
        to arrive; the head is always taken (it chose the worker)."""
        batch, tokens = [], 0
        deadline = time.monotonic() + wait_s
        while True:
            for flow in list(self.queue):
                if batch and tokens + flow.prefill_len > self.batch_tokens:
                    break
                if batch and not accept(flow):
                    continue  # another worker's cache holds its prefix: left for that worker's batch
                self.queue.remove(flow)
                for member in flow.prefill_members:
                    member.to(Stage.RESERVING)
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
        asked_at = self.reservations.room_freed
        results = await asyncio.gather(*(self._reserve(m, only, on_no_room=False) for m in members))
        if all(isinstance(t, worker_pb2.Ticket) for t in results) and not flow.ended:
            return list(results)
        # The group is reserved again from scratch (a moved member is queued already) under the same ids, which a
        # decode worker still holding them refuses ("already reserved"): wait until it has the pages back.
        held = [(m.decode, m.worker_id) for m in members if m.stage is Stage.RESERVED and m.decode is not None]
        for member in members:
            if member.stage in (Stage.RESERVING, Stage.RESERVED) and member.to(Stage.QUEUED):
                member.decode = None
        res = self.reservations
        res.releasing += len(held)
        await asyncio.gather(*(res._release_on(worker, worker_id, holds_pages=True) for worker, worker_id in held))
        if not flow.ended:
            refused = [t for t in results if isinstance(t, NoRoom)]
            last = refused[0].last if refused else ""
            # its own give-backs do not make the refusal stale
            self._no_room(flow, last, asked_at + len(held), any(t.unasked for t in refused))
        return None

    async def _reserve(self, flow: Flow, only: list[WorkerHandle] | None = None,
                       on_no_room: bool = True) -> worker_pb2.Ticket | NoRoom | None:
        """A ticket for the flow on a decode worker with room (the flow is then RESERVED); None if it ended. When
        no worker has room: on_no_room → back to the queue or fail (`_no_room`) and None; else the `NoRoom` (the last
        worker's answer), the flow still RESERVING."""
        asked_at, attempt = self.reservations.room_freed, flow.attempt
        result = await self.reservations.reserve(flow, only)
        if isinstance(result, Granted):  # (no await since the reply: nothing ran in between)
            if flow.ended or flow.attempt != attempt or not flow.to(Stage.RESERVED):
                self.reservations.release_decode(result.worker, result.request_id)  # ended (or moved) meanwhile
                return None
            flow.decode = result.worker
            return result.ticket
        if isinstance(result, Invalid):
            self._end(flow, Outcome("abort", code=grpc.StatusCode.INVALID_ARGUMENT, message=result.message))
            return None
        if result is None:
            return None
        if not on_no_room:
            return result
        if flow.to(Stage.QUEUED):
            self._no_room(flow, result.last, asked_at, result.unasked)
        return None

    def _requeue(self, flow: Flow) -> None:
        """Back to QUEUED from reserving or reserved, giving back a reservation it holds."""
        held = flow.stage
        if flow.to(Stage.QUEUED):
            self.reservations.release(flow, held)
            flow.decode = None

    def waiting(self) -> int:
        """Requests admitted and not yet sent to a prefill worker: queued, or taken into a batch and reserving
        decode pages. --max-queue bounds it for new requests; one put back at the head for want of decode room was
        counted all along, and only a request moved off a lost worker can take it past the cap."""
        return len(self.queue) + sum(f.stage in (Stage.RESERVING, Stage.RESERVED) for f in self.flows.values())

    def _no_room(self, flow: Flow, last: str, asked_at: int, unasked: bool = False) -> None:
        """No decode worker could reserve for the flow (or its group), now QUEUED: wait at the queue's head or
        fail, as router/reservations.py decides."""
        outcome = self.reservations.no_room(flow, last, asked_at, self.flows.values(), unasked)
        if outcome is not None:
            self._end(flow, outcome)
        elif flow not in self.queue:  # (a head moved meanwhile is there already)
            self.queue.appendleft(flow)
            if self.metrics:
                self.metrics.put_back()

    async def _prefill(self, prefill: WorkerHandle, sent: list[tuple[Flow, list[worker_pb2.Ticket]]]) -> None:
        now = time.monotonic()
        members = [m for f, _ in sent for m in f.prefill_members]
        sent_ids = {f.worker_id: f for f in members}
        for flow in members:
            flow.prefill = prefill
            flow.to(Stage.PREFILLING)
            flow.queue_ms = (now - flow.admitted_at) * 1e3
        batch = worker_pb2.PrefillBatch(requests=[_prefill_request(f, tickets) for f, tickets in sent])
        answered: set[str] = set()  # the worker ids whose final result came
        try:
            async for response in self._prefill_call(prefill, batch):
                for result in response.results:
                    flow = sent_ids.get(result.request_id)
                    if flow is None or flow.worker_id != result.request_id:  # a moved flow's old attempt
                        continue
                    if result.transfer_pending:
                        self._on_first_token(flow, result)
                    elif result.request_id not in answered:
                        answered.add(result.request_id)
                        self._on_prefill_result(prefill, flow, result)
        except grpc.aio.AioRpcError as exc:
            lost = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            if lost:
                prefill.mark_dead(f"Prefill: {exc.code().name}: {exc.details()}")
            why = f"prefill worker {prefill.address} failed: {exc.details()}"
            for worker_id, flow in sent_ids.items():
                if flow.worker_id != worker_id or flow.ended or worker_id in answered:  # moved meanwhile (its decode
                    continue  # worker was lost), ended, or its result came before the call failed
                flow.to(Stage.RESERVED)  # the call answered: no prefill in flight to release
                if lost:
                    self._migrate(flow, "prefill", why)
                else:
                    self._end(flow, Outcome("abort", code=grpc.StatusCode.UNAVAILABLE, message=why))
            return
        for worker_id, flow in sent_ids.items():  # a worker that left a request without a result
            if flow.worker_id == worker_id and worker_id not in answered and not flow.ended:
                flow.to(Stage.RESERVED)
                self._end(flow, Outcome("abort", code=grpc.StatusCode.INTERNAL, message=(
                    f"prefill worker {prefill.address} sent no result for the request")))

    async def _prefill_call(self, prefill: WorkerHandle, batch: worker_pb2.PrefillBatch):
        """The batch's answers as they come: PrefillStream's messages, or Prefill's one answer from a worker without
        it (a colocated worker sends its first tokens on its token stream; an older worker says UNIMPLEMENTED)."""
        if prefill.prefill_stream and prefill.kind != "colocated":
            call = prefill.stub.PrefillStream(batch, timeout=self.prefill_timeout_s)
            try:
                async for response in call:
                    yield response
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
            prefill.prefill_stream = False  # (UNIMPLEMENTED comes before any answer: nothing was run)
        yield await prefill.stub.Prefill(batch, timeout=self.prefill_timeout_s)

    def _on_first_token(self, flow: Flow, r: worker_pb2.PrefillResult) -> None:
        """A first token the prefill worker drew while the request's state still travels: delivered now (its final
        result follows; a failed transfer then ends or moves the flow after this token, as after any token)."""
        if flow.ended or flow.stage is not Stage.PREFILLING or flow.first_early or r.first_token_in_stream:
            return
        flow.first_early = True
        if not flow.output_ids:  # (a moved request's usage stays its first prefill's)
            flow.cached_tokens = r.cached_tokens
        if r.HasField("prompt_logprobs"):
            flow.prompt_logprobs = r.prompt_logprobs
        logprobs = first_token_logprobs(r) if flow.spec.logprobs else None
        self._deliver(flow, [r.first_token], r.finish_reason, logprobs)

    def _on_prefill_result(self, prefill: WorkerHandle, flow: Flow, r: worker_pb2.PrefillResult) -> None:
        if flow.ended:
            return
        if not r.ok:  # a failed transfer or a worker-side refusal: transient unless error_code names the request
            flow.to(Stage.RESERVED)  # the call answered: no prefill in flight to release
            why = f"prefill worker {prefill.address}: {r.error}"
            if flow.decode is not None and not flow.decode.alive:  # the transfer failed with its decode worker
                self._migrate(flow, "decode", why)
            else:
                self._end(flow, Outcome("abort", code=worker_error_status(r.error_code), message=why))
            return
        flow.prefill_ms, flow.transfer_ms, flow.transfer_bytes = r.prefill_ms, r.transfer_ms, r.transfer_bytes
        early, flow.first_early = flow.first_early, False
        if (len(flow.output_ids) == 1) if early else not flow.output_ids:  # (a moved request's usage stays its
            flow.cached_tokens = r.cached_tokens  # first prefill's: the one that drew its first token)
            self._note_cached(prefill, flow)
        if r.transfer_bytes:
            prefill.transfers += 1
            prefill.transfer_bytes += r.transfer_bytes
            prefill.transfer_ms += r.transfer_ms
            if self.metrics:
                self.metrics.transfer(r.transfer_bytes, r.transfer_ms / 1e3)
        flow.to(Stage.DECODING)
        if r.HasField("prompt_logprobs"):
            flow.prompt_logprobs = r.prompt_logprobs
        if not r.first_token_in_stream and not early:  # a colocated worker sends its first token on the token stream
            logprobs = first_token_logprobs(r) if flow.spec.logprobs else None
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
        if flow.stage is not Stage.DECODING:  # came before the prefill worker's answer: applied after it
            flow.early.append(event)
            return
        self._apply_decode_event(flow, event)

    def _apply_decode_event(self, flow: Flow, event: worker_pb2.TokenEvent) -> None:
        if flow.ended:
            return
        reason = event.finish_reason
        freed = reason in ("stop", "length", "abort", "error")  # the decode worker ended it: nothing to release there
        if reason == "error":  # the state could not be admitted, or never came: transient as above
            self._end(flow, Outcome("abort", code=worker_error_status(event.error_code),
                                    message=f"decode worker {flow.decode.address}: {event.error}"), decode_freed=True)
        elif reason == "abort":
            self._end(flow, Outcome("abort"), decode_freed=True)
        else:
            if event.HasField("prompt_logprobs"):  # a colocated worker's, with the first token
                flow.prompt_logprobs = event.prompt_logprobs
            if event.spec_draft_tokens:  # on the terminal event
                flow.spec_draft_tokens, flow.spec_accepted_tokens = event.spec_draft_tokens, event.spec_accepted_tokens
            self._deliver(flow, list(event.token_ids), reason, event_logprobs(event) if flow.spec.logprobs else None,
                          decode_freed=freed)

    # --- tokens and the end -----------------------------------------------------------------------------
    def _deliver(self, flow: Flow, token_ids: list[int], worker_finish: str,
                 logprobs: list[TokenLogprob] | None = None, decode_freed: bool = False) -> None:
        """Tokens onto the flow's stream (router/delivery.py), and its end when they end it."""
        outcome = deliver(flow, token_ids, worker_finish, logprobs, self.metrics)
        if outcome is not None:
            self._end(flow, outcome, decode_freed)

    def _end(self, flow: Flow, outcome: Outcome, decode_freed: bool = False) -> None:
        """End the flow with `outcome` (once: later calls do nothing) and release what its stage held (its
        reservation unless the decode worker ended the request itself: `decode_freed`)."""
        if flow.ended:
            return
        held = flow.stage
        if not flow.to(Stage.ENDED):
            return
        flow.outcome = outcome
        self.reservations.ended()
        self.flows.pop(flow.request_id, None)
        self.by_worker_id.pop(flow.worker_id, None)
        rid = flow.members[0].request_id
        if flow in self.requests.get(rid, ()) and all(f.ended for f in flow.members):  # its last choice
            del self.requests[rid]
        if flow in self.queue:  # (not remove-and-catch: deque.remove's miss formats repr(flow), which is slow)
            self.queue.remove(flow)
        flow.hand_over_held()  # tokens held for a fuller chunk go out before the end
        flow.events.put_nowait(("end", outcome))
        if outcome.code is not None and outcome.code != grpc.StatusCode.CANCELLED:
            log.warning("%s: %s", outcome.code.name, outcome.message, extra={"request_id": flow.request_id})
        self.reservations.release(flow, held, decode_freed)
        if self.metrics:
            self.metrics.ended(flow)
        if flow.group is not None and (outcome.code is not None or outcome.finish_reason == "abort"):
            for member in flow.group:  # n > 1 is one request: an abort or a failure of one ends them all
                self._end(member, outcome)
        self.wake.set()

    def _migrate(self, flow: Flow, cause: str, why: str) -> None:
        """Move a flow whose worker was lost (cause: "prefill" or "decode"): back to QUEUED, releasing what its
        attempt still holds, at the head of the queue to be prefilled again with the tokens it already produced;
        fail it once it was moved max_migrations times."""
        if flow.ended:
            return
        if flow.attempt >= self.max_migrations:  # (ending releases what it holds)
            self._end(flow, Outcome("abort", code=grpc.StatusCode.UNAVAILABLE, message=(
                f"{why}; not moved again: it was moved {flow.attempt} times already (--max-migrations)")))
            return
        taken = self.by_worker_id.get(flow.next_worker_id)
        if taken is not None and taken is not flow:  # a client's own id is the one the next attempt would have
            self._end(flow, Outcome("abort", code=grpc.StatusCode.UNAVAILABLE, message=(
                f"{why}; not moved: the id its next attempt would have on the workers, "
                f"{taken.worker_id!r}, is another request's in flight")))
            return
        held = flow.stage
        if held is not Stage.QUEUED and not flow.to(Stage.QUEUED):
            return
        self.reservations.release(flow, held)
        log.warning("moving the request to other workers after %d tokens: %s", len(flow.output_ids), why,
                    extra={"request_id": flow.request_id})
        self.by_worker_id.pop(flow.worker_id, None)
        flow.move(why)
        self.by_worker_id[flow.worker_id] = flow
        if held is Stage.QUEUED and flow in self.queue:
            self.queue.remove(flow)
        self.queue.appendleft(flow)
        self.reservations.blocked = False
        self.wake.set()
        if self.metrics:
            self.metrics.migrated(cause)


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
