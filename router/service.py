"""The public gRPC service (SGLang's `SglangScheduler`, docs/DESIGN.md §5), thin: validate, convert, submit,
stream. Dispatch and the workers are behind `Dispatcher`; this file only speaks the public messages.

The API is open to any client; what it says about the deployment's inside (worker addresses, their errors,
the router's command line) GetServerInfo and GetLoads show only to a caller whose metadata carries the
cluster token (sparsepd/cluster_token.py); others get the counts and loads without them.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import time

import grpc
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

from sparsepd import __version__
from sparsepd.cluster_token import token_matches
from sparsepd.grammar import Grammars, Vocabulary
from sparsepd.proto import sglang_scheduler_pb2 as pb
from sparsepd.proto import sglang_scheduler_pb2_grpc as pb_grpc
from sparsepd.proto import smg_common_pb2 as common
from sparsepd.router.dispatch import Dispatcher, Refused
from sparsepd.router.flow import Flow, Outcome
from sparsepd.router.model_card import ModelCard
from sparsepd.router.params import InvalidRequest, check_grammar, parse_generate
from sparsepd.router.timing import RequestTiming, TimingLog

log = logging.getLogger("sparsepd.router")

TOKENIZER_CHUNK_BYTES = 256 * 1024
SECTIONS = ("core", "memory", "spec", "lora", "disagg", "queues", "all")
# The router's settings anyone may see; the rest (addresses, ports, file paths) only with the cluster token.
PUBLIC_ARGS = ("preset", "served_model_name", "max_queue", "batch_tokens", "batch_wait_ms", "max_new_tokens_limit",
               "reserve_ttl", "drain_timeout")


class SchedulerService(pb_grpc.SglangSchedulerServicer):
    def __init__(self, dispatcher: Dispatcher, card: ModelCard, server_args: dict,
                 max_new_tokens_limit: int | None = None, token: str | None = None,
                 timing: TimingLog | None = None):
        """token: the cluster token a caller must send to see internal addresses (None: everyone sees them);
        timing: where each request's server-side times go (router/timing.py), if anywhere."""
        self.dispatcher, self.card, self.server_args = dispatcher, card, server_args
        self.timing = timing
        self.token = token
        self.max_new_tokens_limit = max_new_tokens_limit
        self.encoder = card.prompt_encoder()
        self.started_at = time.time()
        self.last_request_at = 0.0
        tokenizer = card.files.get("tokenizer.json")  # none: the workers' byte vocabulary (sparsepd/grammar.py)
        self.grammars = Grammars(Vocabulary(vocab_size=card.vocab_size, eos_id=card.eos_id,
                                            tokenizer_json=tokenizer.decode() if tokenizer is not None else None))

    # --- Generate -------------------------------------------------------------------------------------
    async def Generate(self, request, context):
        self.last_request_at = time.time()
        timing = self.timing.start(request.request_id) if self.timing is not None else None
        try:
            try:
                spec = parse_generate(request, self.card, self.encoder, self.max_new_tokens_limit)
                if spec.grammar is not None:  # compiling may take a while (and imports xgrammar the first time)
                    await asyncio.to_thread(check_grammar, spec, self.grammars)
            except InvalidRequest as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            try:
                flows = self.dispatcher.submit_group(spec)
            except Refused as exc:
                await context.abort(exc.code, exc.message)
            flow = flows[0]  # cancelling it cancels every choice still running (the dispatcher ends a group together)
            try:
                async for response in self._stream(flows, timing):
                    yield response
            except asyncio.CancelledError:
                self.dispatcher.cancel(flow)
                raise
            except Exception:  # noqa: BLE001 - a bug here fails this request only
                log.exception("Generate failed", extra={"request_id": flow.request_id})
                self.dispatcher.cancel(flow)
                await context.abort(grpc.StatusCode.INTERNAL,
                                    f"request {flow.request_id}: internal error in the router")
            finally:
                self.dispatcher.cancel(flow)  # no-op once the flow has ended
            failed = next((f.outcome for f in flows if f.outcome is not None and f.outcome.code is not None), None)
            if failed is not None:
                await context.abort(failed.code, failed.message)
        except BaseException as exc:  # an abort (grpc's AbortError), a cancellation or a bug: noted in the timing
            if timing is not None:
                timing.status = _status_name(context, exc)
            raise
        finally:
            if timing is not None:
                self.timing.write(timing)

    async def _stream(self, flows: list[Flow], timing: RequestTiming | None = None):
        """Chunks (stream) and one complete per choice (`index`), in the order the events come; a choice's first
        tokens go out as a chunk of their own even when more are already queued behind them (a slow reader still
        sees the first token alone, as without load); after that, what is already queued goes out as one chunk per
        choice (the dispatcher hands tokens over a chunk's worth at a time: --stream-interval). `timing` notes when
        each response is handed to gRPC."""
        events = _Events(flows)
        sent, left = [0] * len(flows), len(flows)
        try:
            while left:
                new: dict[int, list[int]] = {}  # choice → its tokens in this batch of events
                for i, kind, payload in await events.take():
                    if kind == "tokens" and sent[i] == 0 and i not in new:  # a choice's first tokens: a chunk alone
                        chunk = self._send(flows[i], sent, i, payload, timing)
                        if chunk is not None:
                            yield chunk
                        continue
                    if kind == "tokens":
                        new.setdefault(i, []).extend(payload)
                        continue
                    if i in new:  # its last tokens before its end
                        chunk = self._send(flows[i], sent, i, new.pop(i), timing)
                        if chunk is not None:
                            yield chunk
                    left -= 1
                    if payload.code is None:
                        complete = self._complete(flows[i], payload)
                        if timing is not None:
                            timing.complete()
                        yield complete
                for i, tokens in new.items():
                    chunk = self._send(flows[i], sent, i, tokens, timing)
                    if chunk is not None:
                        yield chunk
        finally:
            events.close()

    def _send(self, flow: Flow, sent: list[int], i: int, tokens: list[int],
              timing: RequestTiming | None) -> pb.GenerateResponse | None:
        """The chunk of choice i's next `tokens` (None when the request does not stream), counted as sent."""
        chunk = self._chunk(flow, sent[i], tokens)
        sent[i] += len(tokens)
        if chunk is not None and timing is not None:
            timing.chunk(len(tokens))
        return chunk

    def _chunk(self, flow: Flow, sent: int, new: list[int]) -> pb.GenerateResponse | None:
        spec = flow.spec
        if not (new and spec.stream):
            return None
        chunk = pb.GenerateStreamChunk(token_ids=new, prompt_tokens=len(spec.input_ids),
                                       completion_tokens=sent + len(new), cached_tokens=flow.cached_tokens,
                                       index=spec.index)
        if spec.logprobs:
            chunk.output_logprobs.CopyFrom(_output_logprobs(flow, sent, sent + len(new)))
        if sent == 0 and spec.logprob_start_len is not None:  # SGLang: in the first chunk only
            chunk.input_logprobs.CopyFrom(_input_logprobs(flow))
        return pb.GenerateResponse(request_id=flow.members[0].request_id, chunk=chunk)

    def _complete(self, flow: Flow, outcome: Outcome) -> pb.GenerateResponse:
        done = pb.GenerateComplete(
            output_ids=flow.output_ids, finish_reason=outcome.finish_reason, prompt_tokens=len(flow.spec.input_ids),
            completion_tokens=len(flow.output_ids), cached_tokens=flow.cached_tokens, queue_ms=flow.queue_ms,
            prefill_ms=flow.prefill_ms,
            transfer_ms=flow.transfer_ms, ttft_ms=flow.ttft_ms, transfer_bytes=flow.transfer_bytes,
            spec_draft_tokens=flow.spec_draft_tokens, spec_accepted_tokens=flow.spec_accepted_tokens)
        if flow.spec.logprobs:
            done.output_logprobs.CopyFrom(_output_logprobs(flow, 0, len(flow.output_ids)))
        if flow.spec.logprob_start_len is not None and flow.prompt_logprobs is not None:
            done.input_logprobs.CopyFrom(_input_logprobs(flow))
        if outcome.matched_token_id is not None:
            done.matched_token_id = outcome.matched_token_id
        elif outcome.matched_stop_str is not None:
            done.matched_stop_str = outcome.matched_stop_str
        text = flow.output_text()
        if text is not None:
            done.output_text = text
        done.index = flow.spec.index
        return pb.GenerateResponse(request_id=flow.members[0].request_id, complete=done)

    # --- management -------------------------------------------------------------------------------------
    async def Abort(self, request, context):
        found = self.dispatcher.abort(request.request_id)
        return pb.AbortResponse(success=found, message=f"request {request.request_id!r} "
                                                       f"{'aborted' if found else 'is not in flight'}")

    async def HealthCheck(self, request, context):
        healthy, message = self.health()
        return pb.HealthCheckResponse(healthy=healthy, message=message)

    def health(self) -> tuple[bool, str]:
        if self.dispatcher.draining:
            return False, "the router is shutting down"
        pool = self.dispatcher.pool
        roles = (("prefill", pool.prefill), ("decode", pool.decode))
        dead = [role for role, ws in roles if not any(w.alive for w in ws)]
        if dead:
            return False, f"no {' and no '.join(dead)} worker is alive"
        return True, f"{sum(w.alive for w in pool.prefill)} prefill and {sum(w.alive for w in pool.decode)} decode " \
                     "workers alive"

    async def GetModelInfo(self, request, context):
        c = self.card
        return pb.GetModelInfoResponse(
            model_path=c.model_path, tokenizer_path=c.model_path if c.has_tokenizer else "", is_generation=True,
            served_model_name=c.served_model_name, max_context_length=c.max_context_length,
            vocab_size=c.vocab_size, supports_vision=False, model_type=_config(c).get("model_type", ""),
            eos_token_ids=[c.eos_id], pad_token_id=c.eos_id, bos_token_id=c.bos_id,
            max_req_input_len=c.max_context_length - 1, architectures=_config(c).get("architectures", []),
            weight_version="default")

    def _insider(self, context) -> bool:
        """Whether the caller may see the deployment's internal addresses (it sent the cluster token)."""
        return self.token is None or token_matches(context.invocation_metadata(), self.token)

    async def GetServerInfo(self, request, context):
        d = self.dispatcher
        insider = self._insider(context)
        decode_tokens = sum(w.stats.num_pages for w in d.pool.decode) * self.card.page_size
        scheduler_info = Struct()
        scheduler_info.update({
            "workers": [w.describe(internal=insider) for w in d.pool.all], "queue_length": len(d.queue),
            "waiting": d.waiting(), "max_queue": d.max_queue, "in_flight": len(d.flows),
            "page_size": self.card.page_size, "batch_tokens": d.batch_tokens, "batch_wait_ms": d.batch_wait_s * 1e3})
        server_args = Struct()
        server_args.update(self.server_args if insider else
                           {k: v for k, v in self.server_args.items() if k in PUBLIC_ARGS})
        start = Timestamp()
        start.FromSeconds(int(self.started_at))
        return pb.GetServerInfoResponse(
            server_args=server_args, scheduler_info=scheduler_info, active_requests=len(d.flows), is_paused=False,
            last_receive_timestamp=self.last_request_at, uptime_seconds=time.time() - self.started_at,
            sglang_version=f"sparsepd-{__version__}", server_type="grpc", start_time=start,
            max_total_num_tokens=decode_tokens)

    async def GetLoads(self, request, context):
        bad = [s for s in request.include if s not in SECTIONS]
        if bad:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"include={bad}: allowed sections {list(SECTIONS)}")
        include = set(request.include) or {"all"}
        await self.dispatcher.pool.poll_once()  # fresh numbers, not the last poll's
        workers = self.dispatcher.pool.all
        if request.HasField("dp_rank"):
            if not 0 <= request.dp_rank < len(workers):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"dp_rank={request.dp_rank}: allowed 0..{len(workers) - 1} (one per worker)")
            workers = [workers[request.dp_rank]]
        loads = [self._load(w, include) for w in workers]
        if not self._insider(context):
            for load in loads:
                load.worker_address = ""
        n = max(len(loads), 1)
        return pb.GetLoadsResponse(
            timestamp=datetime.datetime.now(datetime.UTC).isoformat(), version=f"sparsepd-{__version__}",
            dp_rank_count=len(self.dispatcher.pool.all), loads=loads, aggregate=pb.AggregateMetrics(
                total_running_reqs=sum(x.num_running_reqs for x in loads),
                total_waiting_reqs=sum(x.num_waiting_reqs for x in loads),
                total_reqs=sum(x.num_total_reqs for x in loads),
                avg_token_usage=sum(x.token_usage for x in loads) / n,
                avg_utilization=sum(x.utilization for x in loads) / n))

    def _load(self, w, include: set[str]) -> pb.SchedulerLoad:
        s, page = w.stats, self.card.page_size
        used = (s.num_pages - s.free_pages) * page
        load = pb.SchedulerLoad(
            dp_rank=w.index, num_running_reqs=s.running, num_waiting_reqs=s.waiting,
            num_total_reqs=s.running + s.waiting, num_used_tokens=used, max_total_num_tokens=s.num_pages * page,
            token_usage=used / max(s.num_pages * page, 1), utilization=used / max(s.num_pages * page, 1),
            max_running_requests=s.num_slots, num_waiting_uncached_tokens=w.queued_tokens,
            worker_address=w.address, num_pages=s.num_pages, free_pages=s.free_pages, num_slots=s.num_slots,
            free_slots=s.free_slots, alive=w.alive)
        if include & {"memory", "all"}:
            load.memory.token_capacity = s.num_pages * page
        if include & {"queues", "all"}:
            load.queues.waiting = s.waiting
        if include & {"disagg", "all"}:
            dis = load.disaggregation
            dis.mode = w.role
            if w.role == "prefill":
                dis.prefill_inflight_queue_reqs = w.inflight
                if w.transfer_ms > 0:
                    dis.kv_transfer_speed_gb_s = w.transfer_bytes / (w.transfer_ms / 1e3) / 1e9
                    dis.kv_transfer_latency_ms = w.transfer_ms / w.transfers
            else:
                dis.decode_prealloc_queue_reqs = s.waiting
        return load

    async def GetTokenizer(self, request, context):
        if not self.card.has_tokenizer:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"model {self.card.served_model_name!r} has no tokenizer.json; send token ids")
        data = self.card.tokenizer_zip()
        digest = hashlib.sha256(data).hexdigest()
        for start in range(0, len(data), TOKENIZER_CHUNK_BYTES):
            last = start + TOKENIZER_CHUNK_BYTES >= len(data)
            yield common.GetTokenizerChunk(data=data[start:start + TOKENIZER_CHUNK_BYTES],
                                           sha256=digest if last else "")


def _output_logprobs(flow: Flow, start: int, end: int) -> pb.OutputLogProbs:
    """The log-probabilities of output tokens [start, end) (top ones only when the request asked for them)."""
    lps = flow.logprobs[start:end]
    out = pb.OutputLogProbs(token_logprobs=[x.logprob for x in lps], token_ids=flow.output_ids[start:end])
    if flow.spec.top_logprobs > 0:
        out.top_logprobs.extend(pb.TopLogProbs(values=x.top_logprobs, token_ids=x.top_ids) for x in lps)
    if flow.spec.token_ids_logprob:
        ids = flow.spec.token_ids_logprob
        out.token_ids_logprobs.extend(pb.TopLogProbs(values=x.ids_logprobs, token_ids=ids) for x in lps)
    return out


def _input_logprobs(flow: Flow) -> pb.InputLogProbs:
    """SGLang's input log-probabilities: input tokens s … L−1, token s with no value (router/params.py); the
    top ones and those of token_ids_logprob (our field 1000) when asked for, token s's entries empty."""
    spec, got = flow.spec, flow.prompt_logprobs
    out = pb.InputLogProbs(token_ids=spec.input_ids[spec.logprob_start_len:])
    out.token_logprobs.append(pb.InputTokenLogProb())
    out.token_logprobs.extend(pb.InputTokenLogProb(value=v) for v in got.logprobs)
    if spec.top_logprobs > 0:
        out.top_logprobs.append(pb.TopLogProbs())
        out.top_logprobs.extend(pb.TopLogProbs(values=x.logprobs, token_ids=x.token_ids) for x in got.top_logprobs)
    if spec.token_ids_logprob:
        out.token_ids_logprobs.append(pb.TopLogProbs())
        out.token_ids_logprobs.extend(pb.TopLogProbs(values=x.logprobs, token_ids=spec.token_ids_logprob)
                                      for x in got.token_ids_logprobs)
    return out


def _status_name(context, exc: BaseException) -> str:
    """The status a Generate that did not return ends with: CANCELLED when the caller went away, the code it
    aborted with, else INTERNAL (an exception)."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) and code != grpc.StatusCode.OK else "INTERNAL"


def _config(card: ModelCard) -> dict:
    import json

    try:
        return json.loads(card.files.get("config.json", b"{}"))
    except ValueError:
        return {}


class _Events:
    """The events of a request's flows as (choice index, kind, payload), several at a time: a flow's own queue
    when n = 1, else one queue fed by a task per choice."""

    def __init__(self, flows: list[Flow]):
        self.tasks: list[asyncio.Task] = []
        if len(flows) == 1:
            self.queue, self.tag = flows[0].events, True
            return
        self.queue, self.tag = asyncio.Queue(), False
        self.tasks = [asyncio.create_task(self._forward(i, f)) for i, f in enumerate(flows)]

    async def _forward(self, index: int, flow: Flow) -> None:
        while True:
            kind, payload = await flow.events.get()
            self.queue.put_nowait((index, kind, payload))
            if kind == "end":
                return

    def _tagged(self, item):
        return (0, *item) if self.tag else item

    async def take(self) -> list[tuple[int, str, object]]:
        batch = [self._tagged(await self.queue.get())]
        while not self.queue.empty():
            batch.append(self._tagged(self.queue.get_nowait()))
        return batch

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
