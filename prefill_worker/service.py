"""The prefill worker's control server (grpc.aio): validate, convert, run the batch off the event loop."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc

from sparsepd.engine.sampling import SamplingParams
from sparsepd.prefill_worker.worker import PrefillJob, PrefillOutcome, PrefillWorker
from sparsepd.proto import worker_pb2, worker_pb2_grpc
from sparsepd.proto.convert import sampling_to_dict, top_logprobs


class PrefillService(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, worker: PrefillWorker):
        self.worker = worker
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefill-gpu")
        self.serving = True

    async def Prefill(self, request, context):
        if not self.serving:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the prefill worker is shutting down")
        jobs, refused = [], {}
        for i, r in enumerate(request.requests):
            where = f"requests[{i}] ({r.request_id or 'no id'})"
            if not r.request_id or not r.input_ids:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: request_id and input_ids are required")
            if not r.HasField("ticket") or not r.ticket.transfer_id or not r.ticket.endpoint:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: a ticket with transfer_id and "
                                                                      "endpoint is required")
            try:
                params = SamplingParams.checked(**sampling_to_dict(r.sampling))
            except ValueError as exc:  # this request alone: its batch-mates run
                refused[r.request_id] = PrefillOutcome(r.request_id, ok=False, error=f"{where}: {exc}",
                                                       error_code=grpc.StatusCode.INVALID_ARGUMENT.value[0])
                continue
            jobs.append(PrefillJob(r.request_id, list(r.input_ids), params, r.ticket.transfer_id, r.ticket.endpoint,
                                   r.ticket.fingerprint))
        ids = [r.request_id for r in request.requests]
        if len(set(ids)) != len(ids):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "duplicate request ids in one batch")
        self.worker.open_batch(jobs)
        loop = asyncio.get_running_loop()
        outcomes = await loop.run_in_executor(self.executor, self.worker.run_batch, jobs)
        ran = {o.request_id: o for o in outcomes}
        return worker_pb2.PrefillResponse(results=[_result(refused.get(rid) or ran[rid]) for rid in ids])

    async def Release(self, request, context):
        return worker_pb2.ReleaseResponse(found=self.worker.release(request.request_id))

    async def Health(self, request, context):
        return worker_pb2.HealthResponse(serving=self.serving, role="prefill", fingerprint=self.worker.fingerprint)

    async def Stats(self, request, context):
        pools, c = self.worker.engine.pools, self.worker.counters
        return worker_pb2.StatsResponse(
            role="prefill", num_pages=pools.pages.capacity, free_pages=pools.pages.num_free,
            num_slots=pools.slots.capacity, free_slots=pools.slots.num_free,
            running=len(self.worker.engine.scheduler.running), waiting=len(self.worker.engine.scheduler.waiting),
            transfers_ok=c["transfers_ok"], transfers_failed=c["transfers_failed"],
            transfer_bytes=c["transfer_bytes"])


def _result(o: PrefillOutcome) -> worker_pb2.PrefillResult:
    result = worker_pb2.PrefillResult(request_id=o.request_id, ok=o.ok, error=o.error, first_token=o.first_token,
                                      finish_reason=o.finish_reason, transfer_bytes=o.transfer_bytes,
                                      prefill_ms=o.prefill_ms, transfer_ms=o.transfer_ms,
                                      error_code=o.error_code)
    if o.logprobs is not None:
        result.first_logprob = o.logprobs.logprob
        result.first_top_logprobs.CopyFrom(top_logprobs(o.logprobs.top_ids, o.logprobs.top_logprobs))
    return result
