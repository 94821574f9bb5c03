"""The prefill worker's work: run a batch of prompts (chunked by the engine's token budget), sample each
first token, copy each request's state out of the pools and push it to the decode worker named in its
ticket, then report per request.

A request's pages are freed as soon as its state is copied to host memory (pinned on a GPU); the host
copy lives until the decode worker acknowledges (or the push fails), so the pool never waits on the network.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass

import grpc

from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import OutOfCapacity
from sparsepd.engine.request import Request
from sparsepd.engine.sampling import SamplingParams, TokenLogprobs
from sparsepd.engine.state_io import export_state
from sparsepd.faults import Faults
from sparsepd.prefill_worker.transfer_sender import TransferSender
from sparsepd.proto.transfer import TransferHeader

log = logging.getLogger("sparsepd.prefill")


@dataclass(frozen=True)
class PrefillJob:
    request_id: str
    input_ids: list[int]
    params: SamplingParams
    transfer_id: str
    endpoint: str
    fingerprint: str


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
    error_code: int = 0  # not ok: the status for the client when this request alone is at fault (0 = UNAVAILABLE)


class PrefillWorker:
    def __init__(self, engine: Engine, sender: TransferSender, fingerprint: str, transfer_timeout_s: float = 10.0,
                 faults: Faults | None = None):
        self.engine, self.sender, self.fingerprint = engine, sender, fingerprint
        self.faults = faults or Faults()
        self.transfer_timeout_s = transfer_timeout_s
        self.lock = threading.Lock()  # one batch on the engine at a time
        self.counters: Counter[str] = Counter()
        self.ids_lock = threading.Lock()
        self.open: set[str] = set()  # request ids of the batches received and not yet answered
        self.cancelled: set[str] = set()  # those of them the router released

    def open_batch(self, jobs: list[PrefillJob]) -> None:
        """Note a batch's request ids when it arrives: a Release may come while it waits for the engine."""
        with self.ids_lock:
            self.open.update(j.request_id for j in jobs)

    def run_batch(self, jobs: list[PrefillJob]) -> list[PrefillOutcome]:
        """Prefill every job, push each state, return one outcome per job (in order)."""
        self.open_batch(jobs)
        try:
            with self.lock:
                outcomes = {j.request_id: PrefillOutcome(j.request_id, ok=False) for j in jobs}
                requests = self._submit(jobs, outcomes)
                pending = self._prefill(requests, outcomes)
            self._await_transfers(pending, outcomes)
        finally:  # a Release that comes later finds nothing: no id outlives its batch (ids may be reused)
            ids = {j.request_id for j in jobs}
            with self.ids_lock:
                self.open -= ids
                self.cancelled -= ids
        return [outcomes[j.request_id] for j in jobs]

    def release(self, request_id: str) -> bool:
        """Abort a request of a batch here before its state leaves (at the next step boundary, or once its
        step is done); False when no batch here holds it."""
        with self.ids_lock:
            if request_id not in self.open:
                return False
            self.cancelled.add(request_id)
            return True

    def _submit(self, jobs: list[PrefillJob],
                outcomes: dict[str, PrefillOutcome]) -> dict[str, tuple[Request, PrefillJob]]:
        requests = {}
        for job in jobs:
            if job.fingerprint != self.fingerprint:
                outcomes[job.request_id].error = "the decode worker runs another model (fingerprint mismatch)"
                continue
            try:
                request = self.engine.make_request(job.input_ids, job.params, job.request_id)
                self.engine.scheduler.add(request)
            except (ValueError, OutOfCapacity) as exc:
                outcomes[job.request_id].error = str(exc)
                if isinstance(exc, ValueError):  # this request's own input: a retry cannot help
                    outcomes[job.request_id].error_code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
                continue
            requests[job.request_id] = (request, job)
        return requests

    def _prefill(self, requests, outcomes) -> list[tuple[str, Future, float]]:
        """Step until every request has its first token; export and push each as soon as it has."""
        started, pending = time.perf_counter(), []
        waiting = dict(requests)
        while waiting:
            for rid in [r for r in waiting if r in self.cancelled]:
                self.engine.abort(rid)
                outcomes[rid].error = "aborted"
                del waiting[rid]
            if not waiting:
                break
            self.faults.hit("prefill.step")
            try:
                self.engine.step()
            except Exception as exc:  # noqa: BLE001 - not one request's fault: fail this batch, keep serving
                log.exception("a prefill step failed; failing the %d requests of its batch", len(waiting))
                for rid in waiting:
                    self.engine.abort(rid)
                    outcomes[rid].error = f"the prefill step failed: {type(exc).__name__}: {exc}"
                    outcomes[rid].error_code = grpc.StatusCode.INTERNAL.value[0]
                break
            for rid, (request, job) in list(waiting.items()):
                if request.error:  # failed alone in this step; the engine freed its pages
                    del waiting[rid]
                    outcomes[rid].error, outcomes[rid].error_code = request.error, grpc.StatusCode.INTERNAL.value[0]
                    log.error("prefill failed: %s", request.error, extra={"request_id": rid})
                    continue
                if not request.output_ids:
                    continue
                del waiting[rid]
                out = outcomes[rid]
                if rid in self.cancelled:  # released during the step: its reservation is gone, ship nothing
                    self.engine.abort(rid)
                    out.error = "aborted"
                    continue
                out.first_token, out.finish_reason = request.output_ids[0], request.finish_reason or ""
                out.logprobs = request.output_logprobs[0] if request.output_logprobs else None
                out.prefill_ms = (time.perf_counter() - started) * 1e3
                if request.finish_reason is not None:  # done at the first token: nothing to ship
                    out.ok = True
                    continue
                descriptor, tensors = export_state(self.engine.pools, request)
                self.faults.hit("prefill.push")
                self.engine.abort(rid)  # pages free now; the host copy travels
                header = TransferHeader.from_descriptor(descriptor, transfer_id=job.transfer_id,
                                                        request_id=rid, fingerprint=self.fingerprint)
                out.transfer_bytes = descriptor.num_bytes
                pending.append((rid, self.sender.send(job.endpoint, header, tensors), time.perf_counter()))
        return pending

    def _await_transfers(self, pending, outcomes) -> None:
        for rid, future, t0 in pending:
            out = outcomes[rid]
            try:
                ack = future.result()  # the sender settles every future within its ack timeout
            except Exception as exc:  # noqa: BLE001 - any failure of the push fails this request only
                out.error = f"state transfer failed: {exc}"
                self.counters["transfers_failed"] += 1
                continue
            out.transfer_ms = (time.perf_counter() - t0) * 1e3
            if ack.ok:
                out.ok = True
                self.counters["transfers_ok"] += 1
                self.counters["transfer_bytes"] += out.transfer_bytes
            else:
                out.error = f"decode worker rejected the state: {ack.reason}"
                self.counters["transfers_failed"] += 1
