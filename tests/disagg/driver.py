"""A test driver that plays the router: Reserve on D, Prefill on P with the tickets, stream tokens from D."""

from __future__ import annotations

import asyncio

import grpc

from sparsepd.cluster_token import AuthorizedStub, token_from_env
from sparsepd.proto import worker_pb2, worker_pb2_grpc
from sparsepd.proto.convert import sampling_to_proto
from sparsepd.sampling_params import SamplingParams


async def run_requests(prefill_addr: str, decode_addr: str, prompts: dict[str, list[int]], sampling: dict,
                       ttl_s: float = 10.0, timeout_s: float = 60.0,
                       resume: dict[str, list[int]] | None = None) -> dict[str, dict]:
    """Every request to completion; returns request id → {"tokens", "finish", "error", "transfer_bytes", "spec"
    (the terminal event's draft tokens verified and accepted)}.
    resume: request id → the tokens it already generated (a moved request; "tokens" are the new ones)."""
    async with grpc.aio.insecure_channel(prefill_addr) as pch, grpc.aio.insecure_channel(decode_addr) as dch:
        p = AuthorizedStub(worker_pb2_grpc.PrefillWorkerStub(pch), token_from_env())
        d = AuthorizedStub(worker_pb2_grpc.DecodeWorkerStub(dch), token_from_env())
        out = {rid: {"tokens": [], "finish": "", "error": "", "transfer_bytes": 0, "spec": (0, 0)} for rid in prompts}
        stream = d.StreamTokens(worker_pb2.StreamRequest())
        done = asyncio.Event()
        open_ids = set(prompts)

        async def consume() -> None:
            async for batch in stream:
                for ev in batch.events:
                    if ev.request_id in out and ev.request_id in open_ids:
                        out[ev.request_id]["tokens"].extend(ev.token_ids)
                        if ev.finish_reason:
                            out[ev.request_id]["finish"], out[ev.request_id]["error"] = ev.finish_reason, ev.error
                            out[ev.request_id]["spec"] = (ev.spec_draft_tokens, ev.spec_accepted_tokens)
                            open_ids.discard(ev.request_id)
                if not open_ids:
                    done.set()
                    return

        consumer = asyncio.create_task(consume())
        params = sampling_to_proto(SamplingParams(**sampling))
        tickets = await asyncio.gather(*[
            d.Reserve(worker_pb2.ReserveRequest(request_id=rid, prompt_len=len(ids), sampling=params, ttl_s=ttl_s))
            for rid, ids in prompts.items()])
        batch = worker_pb2.PrefillBatch(requests=[
            worker_pb2.PrefillRequest(request_id=rid, input_ids=ids, sampling=params, ticket=t.ticket,
                                      output_ids=(resume or {}).get(rid, []))
            for (rid, ids), t in zip(prompts.items(), tickets, strict=True)])
        result = await p.Prefill(batch)
        for r in result.results:
            o = out[r.request_id]
            o["transfer_bytes"] = r.transfer_bytes
            if not r.ok:
                o["error"], o["finish"] = r.error, "error"
                open_ids.discard(r.request_id)
                await d.Release(worker_pb2.ReleaseRequest(request_id=r.request_id))
                continue
            o["tokens"].insert(0, r.first_token)
            if r.finish_reason:
                o["finish"] = r.finish_reason
                open_ids.discard(r.request_id)
                await d.Release(worker_pb2.ReleaseRequest(request_id=r.request_id))
        if open_ids:
            await asyncio.wait_for(done.wait(), timeout_s)
        consumer.cancel()
        stream.cancel()
        return out


async def stats(addr: str, role: str) -> worker_pb2.StatsResponse:
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = (worker_pb2_grpc.DecodeWorkerStub if role == "decode" else worker_pb2_grpc.PrefillWorkerStub)(ch)
        stub = AuthorizedStub(stub, token_from_env())
        return await stub.Stats(worker_pb2.StatsRequest())
