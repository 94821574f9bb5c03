"""Colocated mode (`sparsepd decode-worker --colocated`): the decode worker also serves the prefill
control API, and runs each prompt in its own engine, chunked prefill beside the running decodes — the
single-engine serving that disaggregation is compared against, behind the same router and public API.

The router reserves on this worker as on any decode worker and sends the batch here with the tickets it
issued; nothing crosses zmq. `Prefill` answers as soon as the requests are queued
(`first_token_in_stream`): the first token arrives on the token stream like every other.
"""

from __future__ import annotations

import asyncio

import grpc

from sparsepd.decode_worker.service import DecodeService
from sparsepd.decode_worker.worker import DecodeWorker, OutOfCapacity
from sparsepd.proto import worker_pb2, worker_pb2_grpc

ROLE = "colocated"


class ColocatedPrefillService(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, worker: DecodeWorker, decode: DecodeService):
        self.worker, self.decode = worker, decode

    async def Prefill(self, request, context):
        if not self.decode.serving:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the worker is shutting down")
        results = []
        for i, r in enumerate(request.requests):
            if not r.request_id or not r.input_ids or not r.ticket.transfer_id:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"requests[{i}]: request_id, input_ids and a ticket are required")
            ids = [r.request_id, *(f.request_id for f in r.forks)]
            try:
                other = next((t.endpoint for t in [r.ticket, *(f.ticket for f in r.forks)]
                              if t.endpoint != self.decode.endpoint), None)
                if other is not None:
                    raise ValueError(f"the ticket names {other!r}; a colocated worker only runs requests it reserved "
                                     "itself")
                # off the event loop, as Reserve: start_local waits for the engine lock (held through a step's
                # bookkeeping) and copies the cached prefix, and the token streams' messages go out from this loop
                cached = await asyncio.get_running_loop().run_in_executor(
                    None, self.worker.start_local, r.request_id, r.ticket.transfer_id, list(r.input_ids),
                    [(f.request_id, f.ticket.transfer_id) for f in r.forks], list(r.output_ids))
            except (ValueError, OutOfCapacity) as exc:
                results.extend(worker_pb2.PrefillResult(request_id=i, error=str(exc)) for i in ids)
                continue
            results.extend(worker_pb2.PrefillResult(request_id=i, ok=True, first_token_in_stream=True,
                                                    cached_tokens=cached) for i in ids)
        return worker_pb2.PrefillResponse(results=results)

    async def Release(self, request, context):
        return await self.decode.Release(request, context)

    async def Health(self, request, context):
        return await self.decode.Health(request, context)

    async def Stats(self, request, context):
        return await self.decode.Stats(request, context)
