"""Reservations on decode workers, and the accounting of decode room (docs/DESIGN.md §4).

A flow reserves pages and a slot on one decode worker before its prefill is sent (`reserve`: the workers in
placement order, router/placement.py; a refusal for room moves on to the next). What a flow holds follows
from its stage (router/stage.py): `release` gives back what the stage it leaves held — the reservation (a
Release to its decode worker, unless that worker ended the request itself) and a prefill in flight.

When no decode worker has room the flow waits at the queue's head while room may come back — another
request of ours holds pages, a Reserve or Release is in flight, or a decode worker may return — and fails
RESOURCE_EXHAUSTED only when none can (`no_room`). Three numbers decide it: `releasing` (Release calls in
flight: their pages come back when they answer), `room_freed` (requests ended and Releases answered; a
refusal sent before one of them is stale: retried at once, since replies and token streams arrive in any
order) and `blocked` (the batcher waits for one of those before it tries again).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass

import grpc

from sparsepd.proto import worker_pb2
from sparsepd.router.flow import Flow, Outcome
from sparsepd.router.stage import HOLDS_DECODE, Stage
from sparsepd.router.workers import WorkerHandle, WorkerPool

log = logging.getLogger("sparsepd.router")


@dataclass(frozen=True)
class Granted:
    worker: WorkerHandle
    ticket: worker_pb2.Ticket
    request_id: str  # the id it was reserved under (the flow's worker_id when asked)


@dataclass(frozen=True)
class NoRoom:
    last: str  # the last worker's answer
    unasked: bool = False  # a worker was skipped on our view alone (`reserve`): wait, never fail on that


@dataclass(frozen=True)
class Invalid:
    message: str  # a decode worker refused the request itself (INVALID_ARGUMENT)


class Reservations:
    def __init__(self, pool: WorkerPool, reserve_ttl_s: float, spawn: Callable[[Coroutine], None],
                 wake: asyncio.Event):
        self.pool, self.reserve_ttl_s, self._spawn, self.wake = pool, reserve_ttl_s, spawn, wake
        self.blocked = False  # a Reserve found no room: wait for a request to end or a poll before retrying
        self.releasing = 0  # decode Release calls in flight: their pages come back when they answer
        self.room_freed = 0  # counts requests ended and Releases answered: a refusal older than one is stale

    async def reserve(self, flow: Flow, only: list[WorkerHandle] | None = None) -> Granted | NoRoom | Invalid | None:
        """Ask the decode workers (`only`, or all in placement order) until one grants the flow a ticket; None
        when the flow ended meanwhile with nothing granted. Returns on the granting reply, before anything else
        runs: the caller moves the flow to RESERVED (or releases the grant if the flow ended) at once."""
        spec, last = flow.spec, ""
        request = worker_pb2.ReserveRequest(request_id=flow.worker_id, prompt_len=len(spec.input_ids),
                                            sampling=spec.sampling, ttl_s=self.reserve_ttl_s)
        tokens = flow.prefill_len + 1  # what the state fills and its next token: decode workers grow pages on demand
        need = self.pool.placement.pages_for(tokens)
        candidates = [w for w in only if w.alive] if only is not None else self.pool.decode_order(tokens)
        unasked = False
        for worker in candidates:
            if flow.ended:
                return None
            if worker.held_slots and worker.known_full():
                # a Reserve of ours is on its way there and our view says it takes the last slot: this one would be
                # refused (a batch's flows reserve at once). Not asked: the flow waits (`no_room`) for an end, a
                # Release or the next poll, and then asks; our view (it may lag the worker) never fails a request.
                last, unasked = f"{worker.address}: no free slot", True
                continue
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
                    return Invalid(f"decode worker {last}")
                worker.mark_dead(f"Reserve: {exc.code().name}: {exc.details()}")
                continue
            worker.unhold(need, granted=len(reply.ticket.page_ids))
            return Granted(worker, reply.ticket, request.request_id)
        return None if flow.ended else NoRoom(last, unasked)

    def no_room(self, flow: Flow, last: str, asked_at: int, flows: Iterable[Flow],
                unasked: bool = False) -> Outcome | None:
        """A flow (or group) no decode worker could reserve for, asked when `room_freed` was `asked_at`: None if it
        waits at the queue's head (`blocked` set when nothing has changed since it asked), else the outcome it
        fails with. `unasked`: a worker was skipped on our view alone: it waits (the next poll wakes the batcher at
        the latest, and it asks then)."""
        if not any(w.alive for w in self.pool.decode):
            why = self.pool.out_of_service("decode")
            if why is not None:
                return Outcome("abort", code=grpc.StatusCode.UNAVAILABLE, message=flow.failure_message(why))
            self.blocked = True
            return None
        if (unasked or self.releasing or self.room_freed != asked_at or any(f.reserved for f in flows)
                or any(w.held_slots for w in self.pool.decode)):
            self.blocked = self.room_freed == asked_at  # room comes back when a request ends or a Release answers
            return None
        return Outcome("abort", code=grpc.StatusCode.RESOURCE_EXHAUSTED,
                       message=f"no decode worker can hold this request ({last})")

    def ended(self) -> None:
        """A request ended: the room it held is coming back."""
        self.room_freed += 1

    def release(self, flow: Flow, held: Stage, decode_freed: bool = False) -> None:
        """Give back what the flow held in the stage `held` it just left: its reservation (unless its decode worker
        ended the request itself: `decode_freed`) and a prefill in flight."""
        if held in HOLDS_DECODE and flow.decode is not None:
            if decode_freed:
                flow.decode.slot_freed()
            else:
                self.release_decode(flow.decode, flow.worker_id)
        if held is Stage.PREFILLING and flow.prefill is not None:
            self._spawn(self._release_on(flow.prefill, flow.worker_id))

    def release_decode(self, worker: WorkerHandle, request_id: str) -> None:
        self.releasing += 1  # counted now: the flow no longer holds its pages in our view, the worker still does
        self._spawn(self._release_on(worker, request_id, holds_pages=True))

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
                worker.slot_freed()
                self.releasing -= 1
                self.room_freed += 1
                self.wake.set()  # a request waiting for room may fit now
