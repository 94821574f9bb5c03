"""The prefill worker's work: run a batch of prompts (chunked by the engine's token budget), sample each
first token, copy each request's state out of the pools and push it to the decode worker named in its
ticket, then report per request.

A request's pages are freed as soon as its state is copied to host memory (pinned on a GPU); the host
copy lives until the decode worker acknowledges (or the push fails), so the pool never waits on the network.

Threads: `prefill_batch` runs on the engine's thread (the service's one executor thread) and holds the engine
only while it prefills, exports and pushes; it returns a future of the batch's outcomes without waiting for the
acknowledgements, so the next batch's forward starts as soon as this one's is done. Each push's outcome is
filled in by a callback when its future settles (on the sender's thread: the ack, a rejection, a timeout, the
sender closing), and the batch's future resolves after the last one: its answer still comes only once every
state is acknowledged or failed, with the same outcome per request.

A batch's `listener` (the service's PrefillStream) hears of each request sooner: its first token as soon as its
state is pushed (`pending` = True; on the engine's thread), and the final outcome of each pushed request when its
push settles (on the sender's thread); both with a copy of the outcome as it is then.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from functools import partial

import grpc

from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import OutOfCapacity
from sparsepd.engine.request import PromptLogprobs, Request
from sparsepd.engine.sampling import TokenLogprobs
from sparsepd.faults import Faults
from sparsepd.prefill_worker.transfer_sender import TransferSender
from sparsepd.proto.transfer import TransferHeader
from sparsepd.sampling_params import SamplingParams

log = logging.getLogger("sparsepd.prefill")


@dataclass(frozen=True)
class PrefillJob:
    request_id: str
    input_ids: list[int]
    params: SamplingParams
    transfer_id: str
    endpoint: str
    fingerprint: str
    forks: tuple[PrefillJob, ...] = ()  # n > 1: more sequences of this prefill (same input ids, own params/ticket)
    output_ids: tuple[int, ...] = ()  # a moved request: the tokens it already generated (it resumes after them)

    @property
    def members(self) -> tuple[PrefillJob, ...]:
        return (self, *self.forks)


@dataclass
class PrefillOutcome:
    request_id: str
    ok: bool
    error: str = ""
    first_token: int = -1
    finish_reason: str = ""
    transfer_bytes: int = 0
    prefill_ms: float = 0.0
    transfer_ms: float = 0.0
    logprobs: TokenLogprobs | None = None  # the first token's, when asked for
    prompt_logprobs: PromptLogprobs | None = None  # when params.logprob_start_len is set
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache
    error_code: int = 0  # not ok: the status for the client when this request alone is at fault (0 = UNAVAILABLE)


@dataclass
class Batch:
    """A batch from its arrival until its answer: its request ids, those of them the router released (a Release
    applies to the batches open when it comes, not to a later batch that reuses the id), its outcomes, and its
    pushes not yet acknowledged or failed; `done` resolves with the outcomes."""

    members: list[str]  # request ids, the order of the answer
    cancelled: set[str] = field(default_factory=set)  # (under the worker's ids_lock, as `unsettled`)
    outcomes: dict[str, PrefillOutcome] = field(default_factory=dict)
    unsettled: int = 0
    done: Future = field(default_factory=Future)  # → list[PrefillOutcome], in members' order
    listener: Callable[[PrefillOutcome, bool], None] | None = None  # (a copy of an outcome, pending): module doc

    def tell(self, outcome: PrefillOutcome, pending: bool) -> None:
        """Pass a copy of `outcome` to the listener; never raises (it runs inside the engine's and the sender's
        bookkeeping)."""
        if self.listener is None:
            return
        try:
            self.listener(replace(outcome), pending)
        except Exception:  # noqa: BLE001 - a listener gone (its call's loop closed): the batch completes without it
            log.exception("a prefill batch's listener failed", extra={"request_id": outcome.request_id})


class PrefillWorker:
    def __init__(self, engine: Engine, sender: TransferSender, fingerprint: str, transfer_timeout_s: float = 10.0,
                 faults: Faults | None = None):
        self.engine, self.sender, self.fingerprint = engine, sender, fingerprint
        self.faults = faults or Faults()
        self.transfer_timeout_s = transfer_timeout_s
        self.lock = threading.Lock()  # one batch on the engine at a time
        self.counters: Counter[str] = Counter()
        self.ids_lock = threading.Lock()  # the open batches' ids, the transfers in flight and the counters
        self.batches: list[Batch] = []  # the batches received and not yet answered
        self.transfers_in_flight = 0  # states pushed and not yet acknowledged (under ids_lock)
        self.group = None  # a rank of a worker group (engine/group.py): its steps are lockstep ticks, `tick_idle`

    def tick_idle(self, stop) -> None:
        """A group's rank: take part in the group's forwards while no batch runs here (a batch's steps are the
        ticks while it runs), until `stop` (a threading.Event) is set."""
        while not stop.is_set():
            if self.lock.acquire(timeout=0.05):
                try:
                    self.group.step(self.engine)
                finally:
                    self.lock.release()
                if not self.group.busy:
                    stop.wait(0.01)

    def open_batch(self, jobs: list[PrefillJob],
                   listener: Callable[[PrefillOutcome, bool], None] | None = None) -> Batch:
        """Note a batch when it arrives: a Release may come while it waits for the engine. listener: hears of each
        pushed request's first token and of its push's outcome as they come (module doc)."""
        batch = Batch([m.request_id for j in jobs for m in j.members], listener=listener)
        batch.done.set_running_or_notify_cancel()  # (an awaiting caller that is cancelled cannot cancel it)
        with self.ids_lock:
            self.batches.append(batch)
        return batch

    def run_batch(self, jobs: list[PrefillJob]) -> list[PrefillOutcome]:
        """Prefill every job, push each state, return one outcome per job and fork (in order) once every push is
        acknowledged or failed."""
        return self.prefill_batch(jobs).result()

    def prefill_batch(self, jobs: list[PrefillJob], batch: Batch | None = None) -> Future:
        """Prefill every job and push each state; returns at once, without waiting for the acknowledgements, a
        future of one outcome per job and fork (in order) that resolves when every push is acknowledged or
        failed (module docstring). batch: the jobs' `open_batch`, when it was opened on their arrival."""
        batch = batch or self.open_batch(jobs)
        requests, pending = {}, []
        try:
            with self.lock:
                batch.outcomes = {rid: PrefillOutcome(rid, ok=False) for rid in batch.members}
                requests = self._submit(jobs, batch.outcomes)
                self._prefill(requests, batch, pending)
        except BaseException:  # a bug, not an input: the batch fails, nothing of it stays
            self._forget(requests, pending)
            self._close_batch(batch, answer=False)
            raise
        with self.ids_lock:
            batch.unsettled = len(pending)
        if not pending:
            self._close_batch(batch)
        for rid, future, t0 in pending:  # (a future settled already calls back at once, here)
            future.add_done_callback(partial(self._settled, batch, rid, t0))
        return batch.done

    def _forget(self, requests, pending: list[tuple[str, Future, float]]) -> None:
        """After a failure escaped a batch: its requests leave the engine (pages and slots free) and the pushes that
        left before it stay counted in flight until they settle."""
        with self.lock:
            for entry in requests.values():
                request = entry[0]
                if not self.engine.abort(request.request_id) and (request.slot is not None or request.pages):
                    self.engine.release(request)  # finished and kept for its forks
        for _, future, _ in pending:
            future.add_done_callback(self._push_forgotten)

    def _push_forgotten(self, future: Future) -> None:
        """A push of a failed batch settled (on the sender's thread; never raises)."""
        try:
            ok = future.exception() is None and future.result().ok
        except BaseException:  # noqa: BLE001 - cancelled
            ok = False
        with self.ids_lock:
            self.transfers_in_flight -= 1
            self.counters["transfers_ok" if ok else "transfers_failed"] += 1

    def _close_batch(self, batch: Batch, answer: bool = True) -> None:
        """Forget a batch (a Release that comes later finds nothing of it: ids may be reused); resolve its future."""
        with self.ids_lock:
            self.batches.remove(batch)
        if answer:
            batch.done.set_result([batch.outcomes[rid] for rid in batch.members])

    def release(self, request_id: str) -> bool:
        """Abort a request of a batch here before its state leaves (at the next step boundary, or once its
        step is done); False when no batch here holds it."""
        found = False
        with self.ids_lock:
            for batch in self.batches:
                if request_id in batch.members:
                    batch.cancelled.add(request_id)
                    found = True
        return found

    def _submit(self, jobs: list[PrefillJob],
                outcomes: dict[str, PrefillOutcome]) -> dict[str, tuple[Request, PrefillJob]]:
        requests = {}
        for job in jobs:
            if any(m.fingerprint != self.fingerprint for m in job.members):
                for m in job.members:
                    outcomes[m.request_id].error = "the decode worker runs another model (fingerprint mismatch)"
                continue
            try:
                request = self.engine.make_request(job.input_ids, job.params, job.request_id, job.output_ids)
                forks = [self.engine.make_request(job.input_ids, f.params, f.request_id) for f in job.forks]
                for fork in forks:
                    fork.stateless = True  # it only draws here; its state is shipped from the request's
                request.forks = list(forks)
                request.keep_on_finish = bool(forks)  # its state is exported for the forks even if it stops
                self.engine.add(request)
            except (ValueError, OutOfCapacity) as exc:
                for m in job.members:
                    outcomes[m.request_id].error = str(exc)
                    if isinstance(exc, ValueError):  # this request's own input: a retry cannot help
                        outcomes[m.request_id].error_code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
                continue
            requests[job.request_id] = (request, job, list(zip(forks, job.forks, strict=True)))
        return requests

    def _prefill(self, requests, batch: Batch, pending: list[tuple[str, Future, float]]) -> None:
        """Step until every request has its first token; export and push each as soon as it has (a request's
        forks: the same exported state, each with its own first token, to its own ticket); `pending` gets each
        push as it leaves."""
        started, outcomes = time.perf_counter(), batch.outcomes
        waiting = dict(requests)
        while waiting:
            for rid in [r for r in waiting if r in batch.cancelled]:
                self.engine.abort(rid)
                for _, job in self._members(waiting.pop(rid)):
                    outcomes[job.request_id].error = "aborted"
            if not waiting:
                break
            self.faults.hit("prefill.step")
            if self.group is not None:  # a group's rank: a lockstep tick; a failure is fatal (engine/group.py)
                self.group.step(self.engine)
                self._collect(waiting, batch, started, pending)
                continue
            try:
                self.engine.step()
            except Exception as exc:  # noqa: BLE001 - not one request's fault: fail this batch, keep serving
                log.exception("a prefill step failed; failing the %d requests of its batch", len(waiting))
                for rid, entry in waiting.items():
                    self.engine.abort(rid)
                    for _, job in self._members(entry):
                        outcomes[job.request_id].error = f"the prefill step failed: {type(exc).__name__}: {exc}"
                        outcomes[job.request_id].error_code = grpc.StatusCode.INTERNAL.value[0]
                break
            self._collect(waiting, batch, started, pending)

    def _collect(self, waiting, batch: Batch, started: float, pending: list) -> None:
        """Ship the requests of `waiting` that have their first token now (removed from it, their pushes added to
        `pending`)."""
        for rid, entry in list(waiting.items()):
            request = entry[0]
            if len(request.output_ids) <= len(entry[1].output_ids) and request.finish_reason is None:
                continue
            del waiting[rid]
            pending += self._ship(entry, batch, (time.perf_counter() - started) * 1e3)

    @staticmethod
    def _members(entry) -> list[tuple[Request, PrefillJob]]:
        request, job, forks = entry
        return [(request, job), *forks]

    def _ship(self, entry, batch: Batch, prefill_ms: float) -> list[tuple[str, Future, float]]:
        """Report each member's first token; push the state of those that go on (exported once)."""
        request, pending, exported = entry[0], [], None
        for member, job in self._members(entry):
            out = batch.outcomes[job.request_id]
            if job.request_id in batch.cancelled:  # released during the step: its reservation is gone, ship nothing
                out.error = "aborted"
                continue
            if "error" in (member.finish_reason, request.finish_reason):  # failed alone at its first token
                out.error = member.error or request.error  # (a fork of a failed request has no state to ship)
                out.error_code = grpc.StatusCode.INTERNAL.value[0]
                log.error("prefill failed: %s", out.error, extra={"request_id": job.request_id})
                continue
            out.first_token, out.finish_reason = member.output_ids[-1], member.finish_reason or ""  # the one new
            out.logprobs = member.output_logprobs[-1] if member.output_logprobs else None
            if job.params.logprob_start_len is not None:  # a fork's are its source's (one prefill)
                out.prompt_logprobs = PromptLogprobs(job.params.logprob_start_len, tuple(request.prompt_logprobs))
            out.prefill_ms, out.cached_tokens = prefill_ms, request.cached_tokens
            if member.finish_reason is not None:  # done at the first token: nothing to ship
                out.ok = True
                continue
            if exported is None:
                exported = self.engine.export_state(request)
                self.faults.hit("prefill.push")
            descriptor, tensors = exported
            if member is not request:
                descriptor = self.engine.fork_descriptor(descriptor, member)
            header = TransferHeader.from_descriptor(descriptor, transfer_id=job.transfer_id,
                                                    request_id=job.request_id, fingerprint=self.fingerprint)
            out.transfer_bytes = descriptor.num_bytes
            pending.append((job.request_id, self.sender.send(job.endpoint, header, tensors), time.perf_counter()))
            with self.ids_lock:
                self.transfers_in_flight += 1
            batch.tell(out, pending=True)  # its first token, while the state travels
        if not self.engine.abort(request.request_id):  # pages free now; the host copy travels
            self.engine.release(request)  # it finished at its first token but was kept for its forks
        return pending

    def _settled(self, batch: Batch, rid: str, t0: float, future: Future) -> None:
        """A push's future settled (the sender settles every one within its ack timeout, or when it closes): the
        request's outcome; the batch's future after its last push. On the sender's thread: short, and it never
        raises (the batch must complete)."""
        out = batch.outcomes[rid]
        try:
            exc = future.exception()
            if exc is not None:  # any failure of the push fails this request only
                out.error = f"state transfer failed: {exc}"
            else:
                ack = future.result()
                out.ok, out.transfer_ms = ack.ok, (time.perf_counter() - t0) * 1e3
                out.error = "" if ack.ok else f"decode worker rejected the state: {ack.reason}"
        except BaseException as exc:  # noqa: BLE001 - a future cancelled by its caller: this request fails alone
            out.ok, out.error = False, f"state transfer failed: {type(exc).__name__}: {exc}"
        finally:
            batch.tell(out, pending=False)
            with self.ids_lock:  # (callbacks of several batches may run at once: the sender's thread and this one)
                if out.ok:
                    self.counters["transfers_ok"] += 1
                    self.counters["transfer_bytes"] += out.transfer_bytes
                else:
                    self.counters["transfers_failed"] += 1
                self.transfers_in_flight -= 1
                batch.unsettled -= 1
                last = batch.unsettled == 0
            if last:
                self._close_batch(batch)
