"""The prefill worker's control server (grpc.aio): validate, convert, run the batch off the event loop (one
engine thread), await its pushes' acknowledgements on the event loop, answer: Prefill once for the whole batch,
PrefillStream each request's first token as soon as its state is pushed and each result as soon as it is known."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc

from sparsepd.prefill_worker.worker import PrefillJob, PrefillOutcome, PrefillWorker
from sparsepd.proto import worker_pb2, worker_pb2_grpc
from sparsepd.proto.convert import id_logprobs, prefix_cache_stats, prompt_logprobs, sampling_from_proto, top_logprobs
from sparsepd.proto.transfer import REQUEST_ID_RULE, TRANSFER_ID_RULE, request_id_ok, transfer_id_ok


class PrefillService(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, worker: PrefillWorker):
        self.worker = worker
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefill-gpu")
        self.serving = True

    async def Prefill(self, request, context):
        jobs, refused, ids = await self._checked(request, context)
        batch = self.worker.open_batch(jobs)
        outcomes = await self._run(jobs, batch)
        ran = {o.request_id: o for o in outcomes}
        return worker_pb2.PrefillResponse(results=[_result(refused.get(rid) or ran[rid]) for rid in ids])

    async def PrefillStream(self, request, context):
        """Prefill's batch, each result as soon as it is known (worker.proto): the refused ones first, then each
        pushed request's first token (transfer_pending) and its final result as its push settles, then the rest."""
        jobs, refused, ids = await self._checked(request, context)
        if refused:
            yield worker_pb2.PrefillResponse(results=[_result(o) for o in refused.values()])
        loop, heard = asyncio.get_running_loop(), asyncio.Queue()

        def listener(outcome: PrefillOutcome, pending: bool) -> None:  # on the engine's or the sender's thread
            loop.call_soon_threadsafe(heard.put_nowait, (outcome, pending))

        batch = self.worker.open_batch(jobs, listener)
        run = asyncio.ensure_future(self._run(jobs, batch))  # (completes the batch even if this call is cancelled)
        run.add_done_callback(lambda t: t.cancelled() or t.exception())  # (its failure is raised below, if heard)
        final = set(refused)
        while not (run.done() and heard.empty()):
            got = asyncio.ensure_future(heard.get())
            await asyncio.wait((got, run), return_when=asyncio.FIRST_COMPLETED)
            if not got.done():
                got.cancel()
                continue
            outcome, pending = got.result()
            result = _result(outcome, pending)
            if not pending:  # a pushed request's final result: its first token and prompt went with the pending one
                final.add(outcome.request_id)
                result.ClearField("prompt_logprobs")
            yield worker_pb2.PrefillResponse(results=[result])
        rest = [_result(o) for o in run.result() if o.request_id not in final]  # (raises what the batch raised)
        if rest:
            yield worker_pb2.PrefillResponse(results=rest)

    async def _checked(self, request, context):
        """The batch's jobs, the requests refused alone (their outcomes by id) and every member's id in order;
        aborts the call when the batch itself is malformed."""
        if not self.serving:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the prefill worker is shutting down")
        jobs, refused, ids = [], {}, []
        for i, r in enumerate(request.requests):
            where = f"requests[{i}] ({r.request_id or 'no id'})"
            if not r.input_ids:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: input_ids are required")
            members = [(r, where), *((f, f"{where}.forks[{k}]") for k, f in enumerate(r.forks))]
            try:
                if r.forks and r.output_ids:
                    raise ValueError(f"{where}: forks and output_ids: a moved request is resumed alone")
                for m, at in members:
                    _check_ticket(m, at)
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            ids.extend(m.request_id for m, _ in members)
            try:
                forks = tuple(_job(f, list(r.input_ids), at) for f, at in members[1:])
                jobs.append(_job(r, list(r.input_ids), where, forks, tuple(r.output_ids)))
            except ValueError as exc:  # this request (all its choices) alone: its batch-mates run
                for m, _ in members:
                    refused[m.request_id] = PrefillOutcome(m.request_id, ok=False, error=str(exc),
                                                           error_code=grpc.StatusCode.INVALID_ARGUMENT.value[0])
        if len(set(ids)) != len(ids):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "duplicate request ids in one batch")
        return jobs, refused, ids

    async def _run(self, jobs, batch) -> list[PrefillOutcome]:
        """The engine's thread prefills and pushes; the acknowledgements are awaited here, so that thread takes the
        next batch meanwhile (prefill_worker/worker.py)."""
        loop = asyncio.get_running_loop()
        shipped = await loop.run_in_executor(self.executor, self.worker.prefill_batch, jobs, batch)
        return await asyncio.wrap_future(shipped)

    async def Release(self, request, context):
        return worker_pb2.ReleaseResponse(found=self.worker.release(request.request_id))

    async def Health(self, request, context):
        return worker_pb2.HealthResponse(serving=self.serving, role="prefill", fingerprint=self.worker.fingerprint)

    async def Stats(self, request, context):
        engine, c = self.worker.engine, self.worker.counters
        load = engine.load()
        return worker_pb2.StatsResponse(
            role="prefill", num_pages=load.num_pages, free_pages=load.free_pages, num_slots=load.num_slots,
            free_slots=load.free_slots, running=load.running, waiting=load.waiting,
            engine_running=load.running, engine_waiting=load.waiting,
            transfers_in_flight=self.worker.transfers_in_flight,
            transfers_ok=c["transfers_ok"], transfers_failed=c["transfers_failed"],
            transfer_bytes=c["transfer_bytes"], prefix_cache=prefix_cache_stats(engine.prefix_cache),
            forwards=load.forwards)


def _check_ticket(r, where: str) -> None:
    """A PrefillRequest or PrefillFork names itself and its ticket (raises ValueError: the batch is malformed)."""
    if not r.request_id:
        raise ValueError(f"{where}: request_id is required")
    if not r.HasField("ticket") or not r.ticket.transfer_id or not r.ticket.endpoint:
        raise ValueError(f"{where}: a ticket with transfer_id and endpoint is required")


def _job(r, input_ids: list[int], where: str, forks: tuple[PrefillJob, ...] = (),
         output_ids: tuple[int, ...] = ()) -> PrefillJob:
    """A checked PrefillRequest or PrefillFork as a job (raises ValueError when its ids, sampling or output_ids are
    refused)."""
    if not request_id_ok(r.request_id):  # the transfer header carries it: refused here, not when its state leaves
        raise ValueError(f"{where}: request_id of {len(r.request_id)} characters: expected {REQUEST_ID_RULE}")
    if not transfer_id_ok(r.ticket.transfer_id):
        raise ValueError(f"{where}: ticket.transfer_id {r.ticket.transfer_id[:64]!r}: expected {TRANSFER_ID_RULE}")
    try:
        params = sampling_from_proto(r.sampling)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if len(output_ids) >= params.max_new_tokens:
        raise ValueError(f"{where}: {len(output_ids)} output_ids: nothing left to generate with max_new_tokens="
                         f"{params.max_new_tokens}")
    return PrefillJob(r.request_id, input_ids, params, r.ticket.transfer_id, r.ticket.endpoint, r.ticket.fingerprint,
                      forks, output_ids)


def _result(o: PrefillOutcome, pending: bool = False) -> worker_pb2.PrefillResult:
    """The outcome as a result; `pending`: the first token of a request whose state is still travelling (ok)."""
    result = worker_pb2.PrefillResult(request_id=o.request_id, ok=o.ok or pending, error=o.error,
                                      first_token=o.first_token, transfer_pending=pending,
                                      finish_reason=o.finish_reason, transfer_bytes=o.transfer_bytes,
                                      prefill_ms=o.prefill_ms, transfer_ms=o.transfer_ms,
                                      cached_tokens=o.cached_tokens,
                                      error_code=o.error_code)
    if o.logprobs is not None:
        result.first_logprob = o.logprobs.logprob
        result.first_top_logprobs.CopyFrom(top_logprobs(o.logprobs.top_ids, o.logprobs.top_logprobs))
        if o.logprobs.ids_logprobs:
            result.first_token_ids_logprobs.CopyFrom(id_logprobs(o.logprobs.ids_logprobs))
    if o.prompt_logprobs is not None:
        result.prompt_logprobs.CopyFrom(prompt_logprobs(o.prompt_logprobs.start, o.prompt_logprobs.positions))
    return result
