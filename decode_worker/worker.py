"""The decode worker's state and loop: reservations, shipped states admitted into the running batch,
continuous-batching decode, one token message per step.

Per step the loop hands its listeners (the token streams, service.py) the engine's `StepOutput`s as they are,
one list for the whole step and no object of its own per token; the worker's own events (an abort, a state that
could not be admitted, an expired reservation, a failed request with its status code) are `TokenUpdate`s.

Threads: the gRPC server (asyncio) calls `reserve`/`release`; the transfer receiver's thread calls
`on_state`; the loop thread runs the engine's steps. Everything that touches the engine goes through `inbox` or
holds `lock`: what changes a running request (an abort, an arrived state's pool copy and admission) is queued to
the loop and done between steps, and a transfer never blocks a step. The loop holds `lock` over each step but
the engine lets go of it while the forward runs and while the host waits for the step's tokens (`Engine.step`):
a Reserve, a Release of a reservation or a Stats call waits for the step's bookkeeping, not for the device. The
engine changes its lists, allocators and prefix cache only with the lock held and never leaves them half-changed
across a release (engine/scheduler.py), so a reservation sees whole pools; what the forward touches (the running
requests, their pages and slots) no other thread touches.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import OutOfCapacity
from sparsepd.engine.request import PromptLogprobs, Request, StepOutput
from sparsepd.engine.sampling import TokenLogprobs
from sparsepd.engine.state_io import StateDescriptor
from sparsepd.faults import Faults
from sparsepd.proto.convert import prefix_cache_stats, speculative_stats
from sparsepd.sampling_params import SamplingParams

log = logging.getLogger("sparsepd.decode")


@dataclass
class Reservation:
    request: Request
    transfer_id: str
    expires_at: float  # unix seconds


@dataclass(frozen=True)
class TokenUpdate:
    request_id: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "" while running
    error: str = ""
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per token id, when the request asked for them
    prompt_logprobs: PromptLogprobs | None = None  # colocated: with the first token, when the request asked
    error_code: int = 0  # finish "error": the client's status when this request alone is at fault (0 = UNAVAILABLE)
    spec_draft_tokens: int = 0  # the terminal update: the request's draft tokens verified here, and those accepted
    spec_accepted_tokens: int = 0


Update = StepOutput | TokenUpdate  # what listeners get, in step order


class DecodeWorker:
    def __init__(self, engine: Engine, max_ttl_s: float = 30.0, faults: Faults | None = None):
        self.engine = engine
        self.faults = faults or Faults()
        self.max_ttl_s = max_ttl_s
        self.lock = threading.Lock()
        self.reservations: dict[str, Reservation] = {}  # request id → reservation awaiting its state
        self.by_transfer: dict[str, str] = {}  # transfer id → request id
        self.inbox: queue.Queue = queue.Queue()
        self.stop_event = threading.Event()
        self.listeners: list[Callable[[int, list[Update]], None]] = []
        self.counters: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.cancel_transfer: Callable[..., object] = lambda transfer_id, why="": None
        self.expect_transfer: Callable[..., object] = lambda *args, **kwargs: None
        self.transfer_stats: Callable[[], dict] = dict
        self.step_count = 0
        self.group = None  # a rank of a worker group (engine/group.py): every loop turn is one lockstep tick

    # --- called from the control server -----------------------------------------------------------
    def reserve(self, request_id: str, prompt_len: int, params: SamplingParams, ttl_s: float) -> Reservation:
        """A slot and the pages of a request's prompt and first decoded token (raises OutOfCapacity, also when
        that would leave fewer free pages than the running requests' growth needs, `Engine.reserve`);
        decoding adds pages as the request crosses page boundaries (engine/scheduler.py).

        The reservation waits for its state ttl_s seconds (0 = unset), at most this worker's own TTL: the
        worker decides how long its pages may sit idle, whatever a router asks. A grammar is compiled here,
        before the engine lock (compiling takes long: no step should wait for it); a bad one raises ValueError."""
        if params.grammar is not None:
            self.engine.compile_grammar(params.grammar)  # cached: make_request below finds it
        with self.lock:
            running = {r.request_id for r in self._admitted()}
            if request_id in self.reservations or request_id in running:
                raise ValueError(f"request id {request_id!r} is already reserved or running on this worker")
            request = self.engine.make_request([0] * prompt_len, params, request_id)
            if request.max_len > self.engine.cfg.max_seq_len:
                raise ValueError(f"prompt_len {prompt_len} + max_new_tokens {params.max_new_tokens} exceeds "
                                 f"max_seq_len={self.engine.cfg.max_seq_len}")
            # the prompt's pages (its ids come with the state, or with start_local); decoding adds more
            self.engine.reserve(request)
            ttl_s = min(ttl_s, self.max_ttl_s) if ttl_s > 0 else self.max_ttl_s
            res = Reservation(request, uuid.uuid4().hex, time.time() + ttl_s)
            self.reservations[request_id] = res
            self.by_transfer[res.transfer_id] = request_id
            self.expect_transfer(res.transfer_id, request_id, deadline_s=res.expires_at - time.time(),
                                 max_pages=self.engine.pages_for(request.max_len))
            return res

    def full(self) -> bool:
        """No slot is free now: read without the lock, from the control server's event loop, so that a Reserve that
        cannot fit is refused at once (a router keeps asking while it has requests queued), with no executor hop and
        no wait for a step's bookkeeping. A slot freed the next moment is the router's to find: its refusal is stale
        once the request that held the slot has ended (router/reservations.py)."""
        return self.engine.free_slots == 0

    def release(self, request_id: str) -> bool:
        """Abort a request wherever it is here (reserved or decoding); False if unknown."""
        with self.lock:
            res = self.reservations.pop(request_id, None)
            if res is not None:
                self.by_transfer.pop(res.transfer_id, None)
                self.engine.release(res.request)
                self.cancel_transfer(res.transfer_id)
                return True
        self.inbox.put(("abort", request_id))
        return any(r.request_id == request_id for r in self._admitted())

    def start_local(self, request_id: str, transfer_id: str, input_ids: list[int],
                    forks: list[tuple[str, str]] = (), output_ids: list[int] = ()) -> int:
        """Colocated mode: run a reserved request's prefill here, in the decode loop's batches (chunked under
        the token budget beside the decoding requests), instead of receiving its state. `forks` (n > 1): the
        (request id, transfer id) of other reservations that start from this prefill (engine forks);
        `output_ids`: a moved request's tokens so far (it resumes after them, engine.Engine.make_request).
        Returns the prompt tokens restored from this worker's prefix cache. Raises ValueError or OutOfCapacity
        (and changes nothing)."""
        vocab = self.engine.cfg.vocab_size
        with self.lock:
            members = [(request_id, transfer_id), *forks]
            held = []
            for rid, tid in members:
                res = self.reservations.get(rid)
                if res is None or res.transfer_id != tid:
                    raise ValueError(f"request {rid!r} has no reservation with this ticket here")
                if len(input_ids) != len(res.request.prompt_ids):
                    raise ValueError(f"request {rid!r}: {len(input_ids)} input ids, the reservation was for "
                                     f"{len(res.request.prompt_ids)}")
                held.append(res)
            if any(not 0 <= t < vocab for t in [*input_ids, *output_ids]):
                raise ValueError(f"request {request_id!r}: input and output token ids must lie in [0, {vocab})")
            if output_ids and (forks or len(output_ids) >= held[0].request.params.max_new_tokens):
                raise ValueError(f"request {request_id!r}: {len(output_ids)} output ids to resume after: not with "
                                 "forks, and fewer than max_new_tokens")
            if output_ids:  # its prefill covers prompt + output: pages up to its next token (OutOfCapacity)
                self.engine.ensure_pages(held[0].request, len(input_ids) + len(output_ids) + 1)
            for res in held:
                del self.reservations[res.request.request_id]
                self.by_transfer.pop(res.transfer_id, None)
                self.cancel_transfer(res.transfer_id)
                res.request.prompt_ids = list(input_ids)
            leader = held[0].request
            leader.forks = [res.request for res in held[1:]]
            leader.output_ids = list(output_ids)
            leader.sampler.advance(len(output_ids))
            cached = self.engine.restore_prefix(leader)  # this worker's prefix cache (colocated)
            self.inbox.put(("local", leader))  # under the lock: a Release after this queues behind it
            return cached

    def busy(self) -> bool:
        """Whether any request is reserved, waiting to be admitted, or decoding here."""
        with self.lock:
            return bool(self.reservations or self.engine.has_work or not self.inbox.empty())

    def release_all(self) -> int:
        """Abort every request here (shutdown past the drain deadline); returns how many."""
        with self.lock:
            ids = [*self.reservations, *(r.request_id for r in self._admitted())]
        for request_id in ids:
            self.release(request_id)
        return len(ids)

    def expected(self, transfer_id: str, num_pages: int):
        return self.engine.state_specs(num_pages)

    # --- called from the transfer receiver's thread -------------------------------------------------
    def on_state(self, transfer_id: str, descriptor: StateDescriptor, tensors: dict[str, torch.Tensor]) -> None:
        self.inbox.put(("state", transfer_id, descriptor, tensors))

    # --- the loop thread --------------------------------------------------------------------------
    def run(self) -> None:
        # a group's rank goes on ticking after its own stop while another rank still runs requests (lockstep)
        while not self.stop_event.is_set() or (self.group is not None and self.group.busy):
            # (at most 50 ms: retracted requests may wait; a rank does not wait while its group is busy)
            self._drain(block=not self.engine.has_running and not (self.group is not None and self.group.busy))
            self._expire()
            if self.engine.has_work or self.group is not None:  # running, or retracted and waiting for room
                self.faults.hit("decode.step")
                with self.lock:
                    outputs = self._step()
                self.step_count += 1
                failed = [i for i, o in enumerate(outputs) if o.finish_reason == "error"]
                if failed:  # rare: those become updates with the client's status (and are logged)
                    outputs = list(outputs)
                    for i in failed:
                        outputs[i] = _failure(outputs[i])
                self.counters["tokens_generated"] += len(outputs) - len(failed)
                self._publish(outputs)

    def _step(self) -> list[StepOutput]:
        """One engine step; a step that raises (not one request's fault: those fail alone inside it) fails the
        requests running here and the loop goes on."""
        if self.group is not None:  # a group's rank: its step, or an empty one; a failure is fatal (engine/group.py)
            return self.group.step(self.engine, self.lock)
        try:
            return self.engine.step(self.lock)  # (let go of while the device computes: module docstring)
        except Exception as exc:  # noqa: BLE001 - the loop thread must outlive a failed step
            running = [r.request_id for r in self._admitted()]
            log.exception("a decode step failed; failing the %d requests running here", len(running))
            for request_id in running:
                self.engine.abort(request_id)
            why = f"the decode step failed: {type(exc).__name__}: {exc}"
            return [StepOutput(rid, -1, "error", error=f"request {rid}: {why}") for rid in running]

    def _admitted(self) -> list[Request]:
        """Requests whose state is here: running, or retracted (in host memory) and waiting for room."""
        return self.engine.requests()

    def _drain(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, item: tuple) -> None:
        if item[0] == "local":
            with self.lock:
                self.engine.activate(item[1])
            self.counters["local_prefills"] += 1
            return
        if item[0] == "abort":
            with self.lock:
                found = self.engine.abort(item[1])
            if found:
                self._publish([TokenUpdate(item[1], (), "abort")])
            return
        _, transfer_id, descriptor, tensors = item
        self.faults.hit("decode.admit")
        with self.lock:
            request_id = self.by_transfer.pop(transfer_id, None)
            res = self.reservations.pop(request_id, None) if request_id else None
            if res is None:  # released or expired while in flight
                self.counters["late_states"] += 1
                return
            try:
                # a moved request's state covers prompt + output: pages up to its next token
                self.engine.ensure_pages(res.request, descriptor.position + 1)
                self.engine.import_state(res.request, descriptor, tensors)
            except (ValueError, OutOfCapacity) as exc:
                self.rejected[f"import: {exc}"[:80]] += 1
                self.engine.release(res.request)
                self._publish([TokenUpdate(res.request.request_id, (), "error", str(exc))])
                return
            self.engine.activate(res.request)
            self.counters["transfers_ok"] += 1

    def _expire(self) -> None:
        if not self.reservations:  # (read without the lock: one that appears now is checked next turn)
            return
        now = time.time()
        with self.lock:
            expired = [r for r in self.reservations.values() if r.expires_at < now]
            for res in expired:
                del self.reservations[res.request.request_id]
                self.by_transfer.pop(res.transfer_id, None)
                self.engine.release(res.request)
                self.cancel_transfer(res.transfer_id, "the reservation expired")
                self.counters["reservations_expired"] += 1
                log.warning("reservation expired without a state; pages released",
                            extra={"request_id": res.request.request_id})
        for res in expired:
            self._publish([TokenUpdate(res.request.request_id, (), "error", "reservation expired: no state arrived")])

    def _publish(self, updates: list[Update]) -> None:
        if updates:
            for listener in list(self.listeners):
                listener(self.step_count, updates)

    def stats(self) -> dict:
        with self.lock:
            load = self.engine.load()
            return dict(num_pages=load.num_pages, free_pages=load.free_pages,
                        prefix_cache=prefix_cache_stats(self.engine.prefix_cache),
                        num_slots=load.num_slots, free_slots=load.free_slots,
                        running=load.running + load.waiting, waiting=len(self.reservations),
                        engine_running=load.running, engine_waiting=load.waiting, retractions=load.retractions,
                        speculative=speculative_stats(load.speculative), forwards=load.forwards,
                        counters=dict(self.counters), rejected={**dict(self.rejected), **self.transfer_stats()})

    def is_empty(self) -> bool:
        return self.engine.holds_nothing()


def _failure(o: StepOutput) -> TokenUpdate:
    """A request that failed alone in the step (its pages are free again), with the client's status."""
    log.error("decode failed: %s", o.error, extra={"request_id": o.request_id})
    code = grpc.StatusCode.RESOURCE_EXHAUSTED if o.overloaded else grpc.StatusCode.INTERNAL
    return TokenUpdate(o.request_id, (), "error", o.error, error_code=code.value[0])


__all__ = ["DecodeWorker", "OutOfCapacity", "Reservation", "TokenUpdate", "Update"]

