"""A client of the public gRPC API (SGLang's scheduler service): what the server is, and one streamed
Generate per call, timed on arrival of every response."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc
from google.protobuf.json_format import MessageToDict

from sparsepd.loadtest.metrics import CUT, RequestRecord
from sparsepd.loadtest.workload import ModelFacts, Prompt
from sparsepd.proto import sglang_scheduler_pb2 as pb
from sparsepd.proto import sglang_scheduler_pb2_grpc as pb_grpc

CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
INFO_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ServerFacts:
    model: ModelFacts
    served_model_name: str
    preset: str | None
    workers: dict[str, int]  # kind → processes, e.g. {"prefill": 1, "decode": 1} or {"colocated": 1}


def open_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


async def server_facts(stub: pb_grpc.SglangSchedulerStub) -> ServerFacts:
    info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=INFO_TIMEOUT_S)
    server = await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=INFO_TIMEOUT_S)
    args = MessageToDict(server.server_args)
    workers: dict[str, int] = {}
    seen = set()  # a colocated worker is listed once per role it plays: count processes
    for w in MessageToDict(server.scheduler_info).get("workers", []):
        kind, process = str(w.get("kind") or w.get("role") or "unknown"), w.get("address") or w.get("id")
        if (kind, process) not in seen:
            seen.add((kind, process))
            workers[kind] = workers.get(kind, 0) + 1
    special = {*info.eos_token_ids, info.bos_token_id, info.pad_token_id}
    model = ModelFacts(info.vocab_size, info.max_context_length, frozenset(i for i in special if i >= 0))
    return ServerFacts(model, info.served_model_name, args.get("preset"), workers)


async def wait_idle(stub: pb_grpc.SglangSchedulerStub, timeout_s: float = 30.0) -> bool:
    """Wait until the router holds no request (a cut request's release can outlive its cancellation)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        server = await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=INFO_TIMEOUT_S)
        if server.active_requests == 0:
            return True
        await asyncio.sleep(0.1)
    return False


def generate_request(prompt: Prompt, request_id: str, temperature: float, seed: int,
                     stop_token_ids: tuple[int, ...] = ()) -> pb.GenerateRequest:
    """A streamed request that generates exactly `prompt.output_len` tokens (ignore_eos, and min_new_tokens =
    max_new_tokens, as `min_tokens` = `max_tokens` through the OpenAI gateway): EOS and `stop_token_ids` are
    never drawn."""
    sampling = pb.SamplingParams(temperature=temperature, top_p=1.0, top_k=-1, max_new_tokens=prompt.output_len,
                                 min_new_tokens=prompt.output_len, ignore_eos=True, seed=seed,
                                 stop_token_ids=stop_token_ids)
    tokenized = pb.TokenizedInput(input_ids=prompt.input_ids or (), original_text=prompt.text or "")
    return pb.GenerateRequest(request_id=request_id, tokenized=tokenized, sampling_params=sampling, stream=True)


async def send(stub: pb_grpc.SglangSchedulerStub, request: pb.GenerateRequest, timeout_s: float,
               records: list[RequestRecord], conversation: int | None = None,
               turn: int | None = None) -> RequestRecord:
    """Stream one request; its record (status OK, a gRPC status name, or CUT if cancelled) joins `records`
    (labelled with its conversation and turn in a multi-turn run)."""
    record = RequestRecord(start_s=time.perf_counter(), input_tokens=len(request.tokenized.input_ids),
                           conversation=conversation, turn=turn)
    records.append(record)
    try:
        complete = None
        async for response in stub.Generate(request, timeout=timeout_s):
            now = time.perf_counter()
            if response.HasField("chunk"):
                chunk = response.chunk
                if chunk.token_ids:
                    record.chunk_times_s.append(now)
                    record.chunk_tokens.append(len(chunk.token_ids))
                record.input_tokens = chunk.prompt_tokens or record.input_tokens
                record.cached_tokens = chunk.cached_tokens or record.cached_tokens
            else:
                complete = response.complete
        record.end_s = time.perf_counter()
        if complete is None:
            record.status, record.error = "NO_COMPLETE", "the stream ended without a GenerateComplete"
        else:
            _take_complete(record, complete)
    except grpc.aio.AioRpcError as exc:
        record.end_s = time.perf_counter()
        record.status, record.error = exc.code().name, exc.details() or ""
    except asyncio.CancelledError:
        record.end_s = time.perf_counter()
        record.status = CUT
        raise
    return record


def _take_complete(record: RequestRecord, done: pb.GenerateComplete) -> None:
    record.input_tokens = done.prompt_tokens or record.input_tokens
    record.output_tokens = done.completion_tokens
    record.output_ids = list(done.output_ids)
    record.cached_tokens = done.cached_tokens or record.cached_tokens
    record.finish_reason = done.finish_reason
    record.queue_ms, record.prefill_ms, record.transfer_ms = done.queue_ms, done.prefill_ms, done.transfer_ms
    record.server_ttft_ms, record.transfer_bytes = done.ttft_ms, done.transfer_bytes
    record.spec_draft_tokens, record.spec_accepted_tokens = done.spec_draft_tokens, done.spec_accepted_tokens
