"""The public API through a real gRPC client against real processes: greedy tokens equal the single-process
engine for 32 concurrent streams; every error has its status; abort, cancel and deadline free the pools
on both workers; stop strings match across chunks; output and prompt log-probabilities (with chosen token ids)
equal the reference; health, reflection, tokenizer, loads and metrics."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).parent))
from logprob_helpers import IDS, TOP, check_input, check_output, check_streamed, logprob_request  # noqa: E402
from logprob_helpers import reference as logprob_reference  # noqa: E402
from router_helpers import channel, collect, generate_request, run, stub_of, wait_all_free  # noqa: E402

from sparsepd.cluster_token import AuthorizedStub, token_from_env  # noqa: E402
from sparsepd.engine.generate import generate_with_engine  # noqa: E402
from sparsepd.engine.sampling import SamplingParams  # noqa: E402
from sparsepd.model.weights import build_model  # noqa: E402
from sparsepd.model_config import get_preset  # noqa: E402
from sparsepd.proto import sglang_scheduler_pb2 as pb  # noqa: E402
from sparsepd.proto import smg_common_pb2  # noqa: E402
from sparsepd.proto.transfer import MAX_ID_CHARS, REQUEST_ID_RULE  # noqa: E402

# Mixed lengths around the tiny preset's page (16), window (16) and HCA ratio (16) boundaries.
LENGTHS = [1, 3, 4, 5, 15, 16, 17, 31, 33, 47, 64, 65, 80, 97, 100, 120]
MAX_NEW = 10


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny"), seed=0)


def engine_greedy(model, ids: list[int], max_new: int) -> list[int]:
    return generate_with_engine(model, ids, SamplingParams(max_new_tokens=max_new, ignore_eos=True)).output_ids


@pytest.fixture(scope="module")
def reference(model):
    gen = torch.Generator().manual_seed(5)
    prompts = {f"e2e-{i}": torch.randint(0, 256, (LENGTHS[i % len(LENGTHS)] + i // len(LENGTHS),),
                                         generator=gen).tolist() for i in range(32)}
    return prompts, {rid: engine_greedy(model, ids, MAX_NEW) for rid, ids in prompts.items()}


def test_32_concurrent_streams_equal_the_single_process_engine(deployment, reference):
    prompts, want = reference

    async def main():
        async with channel(deployment["router"]) as ch:
            stub = stub_of(ch)
            results = await asyncio.gather(*[
                collect(stub, generate_request(ids, MAX_NEW, stream=i % 2 == 0, request_id=rid))
                for i, (rid, ids) in enumerate(prompts.items())])
            await wait_all_free(stub)
            return results

    results = run(main())
    for (rid, ids), (chunks, done), i in zip(prompts.items(), results, range(len(prompts)), strict=True):
        assert list(done.output_ids) == want[rid], rid
        assert done.finish_reason == "length" and done.completion_tokens == MAX_NEW and done.prompt_tokens == len(ids)
        assert done.transfer_bytes > 0 and done.ttft_ms > 0
        if i % 2 == 0:  # streamed: the chunks add up to the output, with cumulative counts
            assert [t for c in chunks for t in c.token_ids] == want[rid]
            assert [c.completion_tokens for c in chunks] == list(
                torch.tensor([len(c.token_ids) for c in chunks]).cumsum(0).tolist())
        else:
            assert chunks == []


def test_original_text_is_tokenized_by_the_router(deployment, model):
    async def main():
        async with channel(deployment["router"]) as ch:
            request = generate_request([], 6)
            request.tokenized.original_text = "Hello"
            return await collect(stub_of(ch), request)

    _, done = run(main())
    ids = list(b"Hello")  # the tiny tokenizer's rule: no special token on a text (sparsepd/prompt_encoding.py)
    assert done.prompt_tokens == len(ids)
    assert list(done.output_ids) == engine_greedy(model, ids, 6)


def _bad(request_id: str, **changes) -> pb.GenerateRequest:
    req = generate_request([256, 1, 2, 3], 8, request_id=request_id)
    for path, value in changes.items():
        target, *rest = path.split("__")
        obj = getattr(req, target) if rest else req
        name = rest[0] if rest else target
        if isinstance(value, list):
            getattr(obj, name).extend(value)
        else:
            setattr(obj, name, value)
    return req


BAD_REQUESTS = [
    ("empty input", generate_request([], 4), "empty"),
    ("input beyond the context", generate_request([1] * 1024, 4), "context length is 1024"),
    ("max_new_tokens over the limit", generate_request([1] * 10, 1015), "max_new_tokens=1015"),
    ("max_new_tokens zero", generate_request([1] * 10, 0), "max_new_tokens=0"),
    ("negative temperature", _bad("t", sampling_params__temperature=-0.5), "temperature=-0.5"),
    ("top_p zero", _bad("p", sampling_params__top_p=0.0), "top_p=0"),
    ("top_p above one", _bad("p1", sampling_params__top_p=1.5), "top_p=1.5"),
    ("top_k below -1", _bad("k", sampling_params__top_k=-2), "top_k=-2"),
    ("min_p one", _bad("m", sampling_params__min_p=1.0), "min_p=1"),
    ("token id outside the vocabulary", generate_request([5, 260], 4), "input_ids[1]=260"),
    ("stop token outside the vocabulary", _bad("s", sampling_params__stop_token_ids=[300]), "300"),
    ("n over the limit", _bad("n", sampling_params__n=65), "n=65 is out of range"),
    ("a grammar that does not compile", _bad("g", sampling_params__regex="[a-z"),
     "sampling_params.regex: regex does not compile"),
    ("a penalty out of range", _bad("f", sampling_params__frequency_penalty=2.5), "frequency_penalty=2.5"),
    ("log-probabilities from beyond the input", _bad("l", return_logprob=True, logprob_start_len=4),
     "logprob_start_len=4 is out of range"),
    ("too many top log-probabilities", _bad("l2", return_logprob=True, top_logprobs_num=21),
     "top_logprobs_num=21 is out of range"),
    ("top log-probabilities without return_logprob", _bad("l3", top_logprobs_num=2), "needs return_logprob"),
    ("log-probabilities of ids outside the vocabulary", _bad("l4", return_logprob=True, token_ids_logprob=[300]),
     "token_ids_logprob contains [300]"),
    ("log-probabilities from below -1", _bad("l5", return_logprob=True, logprob_start_len=-2),
     "logprob_start_len=-2 is out of range"),
    ("log-probabilities of too many ids", _bad("l6", return_logprob=True, token_ids_logprob=list(range(65))),
     "token_ids_logprob has 65 ids"),
    ("ids without return_logprob", _bad("l7", token_ids_logprob=[7]), "needs return_logprob"),
    ("multimodal input", _bad("mm", mm_inputs__image_urls=["http://x/y.png"]), "multimodal"),
    ("input embeddings", _bad("emb", input_embeds=[0.5, 0.25]), "embeddings"),
]


@pytest.mark.parametrize("name,request_,needle", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_are_invalid_argument_naming_the_field(deployment, name, request_, needle):
    async def main():
        async with channel(deployment["router"]) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub_of(ch), request_)
            return err.value

    err = run(main())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err)
    assert needle in err.details(), (name, err.details())


def _router_counts(metrics_url: str) -> tuple[float, float]:
    """(requests admitted, requests that ended INVALID_ARGUMENT) from the router's metrics."""
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    admitted = sum(s.value for s in families["sparsepd_router_admitted_requests"].samples if s.name.endswith("_total"))
    invalid = sum(s.value for s in families["sparsepd_router_requests"].samples
                  if s.name.endswith("_total") and s.labels.get("outcome") == "invalid_argument")
    return admitted, invalid


BAD_IDS = [
    ("over the limit", "x" * 300, {}),
    ("a control character", "tab\there", {}),
    ("the limit, with no room for a move's suffix", "y" * MAX_ID_CHARS, {}),
    ("room for a move but not for the last choice's suffix", "z" * (MAX_ID_CHARS - 3), {"sampling_params__n": 12}),
]


@pytest.mark.parametrize("name,request_id,changes", BAD_IDS, ids=[b[0] for b in BAD_IDS])
def test_an_id_the_transfer_cannot_carry_is_refused_at_admission(deployment, name, request_id, changes):
    """Refused by the router before anything is reserved (not admitted: no decode reservation, no prefill, no
    ended request), naming the rule; the same deployment then serves a request at once."""
    before = _router_counts(deployment["metrics"])

    async def main():
        async with channel(deployment["router"]) as ch:
            stub = stub_of(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub, _bad(request_id, **changes))
            loads = await wait_all_free(stub, timeout=1.0)
            _, done = await collect(stub, generate_request([256, *b"after"], 3, request_id="y" * (MAX_ID_CHARS - 2)))
            return err.value, loads, done

    err, loads, done = run(main())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err)
    assert REQUEST_ID_RULE in err.details() and "request_id" in err.details(), err.details()
    assert _router_counts(deployment["metrics"]) == (before[0] + 1, before[1])  # only the good request admitted
    assert done.finish_reason == "length" and len(done.output_ids) == 3
    assert all(x.free_slots == x.num_slots for x in loads.loads)


def test_other_rpcs_of_the_service_are_unimplemented(deployment):
    async def main():
        async with channel(deployment["router"]) as ch:
            embed = ch.unary_unary("/sglang.grpc.scheduler.SglangScheduler/Embed",
                                   request_serializer=lambda b: b, response_deserializer=lambda b: b)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await embed(b"")
            return err.value.code()

    assert run(main()) == grpc.StatusCode.UNIMPLEMENTED


def test_abort_mid_stream_ends_with_abort_and_frees_both_workers(deployment):
    async def main():
        async with channel(deployment["router"]) as ch:
            stub = stub_of(ch)
            call = stub.Generate(generate_request([256, *b"abort me"], 400, stream=True, request_id="to-abort"))
            first = await call.read()
            assert first.HasField("chunk")
            reply = await stub.Abort(pb.AbortRequest(request_id="to-abort"))
            rest = []
            while (response := await call.read()) != grpc.aio.EOF:
                rest.append(response)
            missing = await stub.Abort(pb.AbortRequest(request_id="to-abort"))
            await wait_all_free(stub)
            return reply, rest, missing

    reply, rest, missing = run(main())
    assert reply.success and not missing.success
    done = rest[-1].complete
    assert rest[-1].HasField("complete") and done.finish_reason == "abort"
    assert 1 <= len(done.output_ids) < 400


def test_client_cancel_and_deadline_free_both_workers(deployment):
    async def main():
        async with channel(deployment["router"]) as ch:
            stub = stub_of(ch)
            call = stub.Generate(generate_request([256, *b"cancel me"], 400, stream=True))
            await call.read()
            call.cancel()
            await wait_all_free(stub)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub, generate_request([256, *b"too slow"], 600, stream=True), timeout=0.5)
            await wait_all_free(stub)
            return err.value.code()

    assert run(main()) == grpc.StatusCode.DEADLINE_EXCEEDED


def test_decode_worker_streams_one_message_per_step_with_every_requests_tokens(deployment):
    """A second subscriber of the decode worker's StreamTokens sees what the router sees: one StepBatch per
    decode step (steps strictly increasing), carrying the new token of every running request, here 4 at once."""
    from sparsepd.proto import worker_pb2, worker_pb2_grpc

    ids = {f"steps-{i}": [256, *bytes([65 + i]) * 20] for i in range(4)}

    async def main():
        async with channel(deployment["decode"]) as dch, channel(deployment["router"]) as rch:
            decode = AuthorizedStub(worker_pb2_grpc.DecodeWorkerStub(dch), token_from_env())
            stream = decode.StreamTokens(worker_pb2.StreamRequest())
            await asyncio.sleep(0.5)  # subscribed before the requests start
            stub = stub_of(rch)
            # 40 tokens each: long enough that the four decode together even when their prefills arrive spread
            # out on a loaded machine (at 12, a request could end before the last one started: no full step)
            replies = asyncio.gather(*(collect(stub, generate_request(p, 40, stream=True, request_id=rid))
                                       for rid, p in ids.items()))
            steps, ended = [], set()
            while ended != set(ids):
                batch = await asyncio.wait_for(stream.read(), 30)
                events = [(e.request_id, list(e.token_ids), e.finish_reason) for e in batch.events
                          if e.request_id in ids]
                steps.append((batch.step, events))
                ended |= {rid for rid, _, finish in events if finish}
            stream.cancel()
            return steps, await replies

    steps, replies = run(main())
    numbers = [step for step, _ in steps]
    assert numbers == sorted(set(numbers)), numbers  # strictly increasing: never a step split over two messages
    for rid, (_, done) in zip(ids, replies, strict=True):
        tokens = [t for _, events in steps for r, toks, _ in events if r == rid for t in toks]
        assert tokens == list(done.output_ids[1:]), rid  # the first token comes from the prefill worker
    full = [events for _, events in steps if len(events) == 4]
    assert full, [len(events) for _, events in steps]  # the 4 requests decoded together: one message per step
    assert all(sorted(r for r, _, _ in events) == sorted(ids) and all(len(t) == 1 for _, t, _ in events)
               for events in full), steps


def _first_index(tokens: list[int], text_ids: list[int]) -> int:
    return next(i for i in range(len(tokens)) if tokens[i:i + len(text_ids)] == text_ids)


def test_stop_strings_match_across_chunks_and_are_trimmed(deployment, model):
    ids = [256, *b"stop strings"]
    out = engine_greedy(model, ids, 60)
    # A stop string made of three consecutive printable output bytes: each arrives in its own chunk.
    start = next(i for i in range(2, len(out) - 3) if all(32 <= t < 127 for t in out[i:i + 3])
                 and bytes(out[i:i + 3]) not in bytes(out[:i + 2]))
    stop = bytes(out[start:start + 3]).decode()
    end = _first_index(out, out[start:start + 3]) + 3

    async def main(**kw):
        async with channel(deployment["router"]) as ch:
            return await collect(stub_of(ch), generate_request(ids, 60, stream=True, stop=[stop], **kw))

    chunks, done = run(main())
    assert list(done.output_ids) == out[:end] and done.finish_reason == "stop"
    assert done.matched_stop_str == stop and len(chunks) >= 3
    text = bytes(out[:end]).decode("utf-8", errors="replace")
    assert done.output_text == text[:text.index(stop)]
    _, kept = run(main(no_stop_trim=True))
    assert kept.output_text == text


def test_stop_token_ids_and_min_new_tokens(deployment, model):
    ids = [256, *b"stop token"]
    out = engine_greedy(model, ids, 40)
    stop_token = out[3]
    first = out.index(stop_token)

    async def main(**kw):
        async with channel(deployment["router"]) as ch:
            return await collect(stub_of(ch), generate_request(ids, 40, stop_token_ids=[stop_token], **kw))

    _, done = run(main())
    assert list(done.output_ids) == out[:first + 1] and done.finish_reason == "stop"
    assert done.matched_token_id == stop_token
    # Until min_new_tokens the workers mask the stop token (and EOS): the output follows another path, the
    # single-process engine's under the same parameters.
    min_new = first + 2
    params = SamplingParams(max_new_tokens=40, min_new_tokens=min_new, stop_token_ids=(stop_token,), ignore_eos=True)
    want = generate_with_engine(model, ids, params)
    assert stop_token not in want.output_ids[:min_new]
    _, held = run(main(min_new_tokens=min_new))
    assert list(held.output_ids) == want.output_ids and held.finish_reason == want.finish_reason
    if want.finish_reason == "stop":
        assert held.matched_token_id == want.output_ids[-1]


def test_logprobs_equal_the_single_process_engine(deployment, model):
    ids = [256, *b"log probabilities"]
    params = SamplingParams(max_new_tokens=9, ignore_eos=True, logprobs=True, top_logprobs=3)
    want = generate_with_engine(model, ids, params)

    async def main(stream: bool):
        async with channel(deployment["router"]) as ch:
            request = generate_request(ids, 9, stream=stream)
            request.return_logprob, request.top_logprobs_num = True, 3
            return await collect(stub_of(ch), request)

    for stream in (True, False):
        chunks, done = run(main(stream))
        lps = done.output_logprobs
        assert list(done.output_ids) == want.output_ids == list(lps.token_ids)
        assert len(lps.token_logprobs) == len(lps.top_logprobs) == 9
        for got_lp, got_top, ref in zip(lps.token_logprobs, lps.top_logprobs, want.logprobs, strict=True):
            assert abs(got_lp - ref.logprob) < 1e-5 and list(got_top.token_ids) == list(ref.top_ids)
            assert max(abs(a - b) for a, b in zip(got_top.values, ref.top_logprobs, strict=True)) < 1e-5
        if stream:  # the chunks carry the same values, token for token
            streamed = [v for c in chunks for v in c.output_logprobs.token_logprobs]
            assert streamed == list(lps.token_logprobs)
            assert all(len(c.output_logprobs.token_ids) == len(c.token_ids) for c in chunks)


def test_prompt_logprobs_and_token_ids_logprob_equal_the_reference(deployment, model):
    """Beside a plain request: a streamed one from the first prompt token with top 2 and two chosen ids, and a
    whole one from mid-prompt; the prefill worker scores the prompt, the decode worker the chosen ids."""
    gen = torch.Generator().manual_seed(29)
    first, mid = (torch.randint(0, 256, (n,), generator=gen).tolist() for n in (12, 20))
    ref = {"first": logprob_reference(model, first, 3), "mid": logprob_reference(model, mid, 3)}
    requests = [logprob_request(first, 3, 0, TOP, IDS, stream=True), logprob_request(mid, 3, 7),
                generate_request(mid, 3)]

    async def main():
        async with channel(deployment["router"]) as ch:
            stub = stub_of(ch)
            results = await asyncio.gather(*[collect(stub, r) for r in requests])
            await wait_all_free(stub)
            return results

    (chunks, done), (_, whole), (_, plain) = run(main())
    check_input(done.input_logprobs, first, 0, TOP, IDS, ref["first"])
    check_output(done.output_logprobs, TOP, IDS, ref["first"])
    check_streamed(chunks, done)
    check_input(whole.input_logprobs, mid, 7, 0, [], ref["mid"])
    check_output(whole.output_logprobs, 0, [], ref["mid"])
    assert list(plain.output_ids) == ref["mid"].output_ids
    assert not plain.HasField("input_logprobs") and not plain.HasField("output_logprobs")


def test_health_reflection_model_info_and_tokenizer(deployment):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    async def main():
        async with channel(deployment["router"]) as ch:
            stub = stub_of(ch)
            health = await stub.HealthCheck(pb.HealthCheckRequest())
            std = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
            info = await stub.GetModelInfo(pb.GetModelInfoRequest())
            server = await stub.GetServerInfo(pb.GetServerInfoRequest())
            chunks = [c async for c in stub.GetTokenizer(smg_common_pb2.GetTokenizerRequest())]
            return health, std, info, server, chunks

    health, std, info, server, chunks = run(main())
    assert health.healthy and std.status == health_pb2.HealthCheckResponse.SERVING
    assert (info.vocab_size, info.max_context_length, list(info.eos_token_ids), info.bos_token_id) == (
        260, 1024, [257], 256)
    assert info.served_model_name == "sparsepd/tiny" and info.architectures and info.model_type
    workers = server.scheduler_info["workers"]
    assert sorted(w["role"] for w in workers) == ["decode", "prefill"] and all(w["alive"] for w in workers)
    assert server.scheduler_info["queue_length"] == 0
    data = b"".join(c.data for c in chunks)
    assert all(not c.sha256 for c in chunks[:-1]) and chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
    files = zipfile.ZipFile(io.BytesIO(data))
    assert sorted(files.namelist()) == ["config.json", "tokenizer.json", "tokenizer_config.json"]
    assert "chat_template" in json.loads(files.read("tokenizer_config.json"))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(files.read("tokenizer.json").decode())
    assert tok.encode("<|begin_of_text|>hé").ids == [256, 104, 195, 169]

    with grpc.insecure_channel(deployment["router"]) as sync_ch:  # reflection (a blocking client)
        services = set(ProtoReflectionDescriptorDatabase(sync_ch).get_services())
    assert {"sglang.grpc.scheduler.SglangScheduler", "grpc.health.v1.Health"} <= services


def test_loads_report_every_worker_with_transfer_numbers(deployment):
    async def main():
        async with channel(deployment["router"]) as ch:
            stub = stub_of(ch)
            await collect(stub, generate_request([256, *b"loads"], 4))
            return await wait_all_free(stub), await stub.GetLoads(pb.GetLoadsRequest(include=["core"]))

    loads, core = run(main())
    by_mode = {x.disaggregation.mode: x for x in loads.loads}
    assert set(by_mode) == {"prefill", "decode"} and loads.dp_rank_count == 2
    assert by_mode["prefill"].disaggregation.kv_transfer_speed_gb_s > 0
    assert by_mode["prefill"].disaggregation.kv_transfer_latency_ms > 0
    assert all(x.max_total_num_tokens == 192 * 16 and x.token_usage == 0 for x in loads.loads)
    assert all(not x.HasField("disaggregation") for x in core.loads)


def test_metrics_endpoint_parses(deployment):
    async def main():
        async with channel(deployment["router"]) as ch:
            await collect(stub_of(ch), generate_request([256, *b"metrics"], 3))

    run(main())
    with urllib.request.urlopen(deployment["metrics"], timeout=5) as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    finished = {s.labels.get("outcome"): s.value for s in families["sparsepd_router_requests"].samples
                if s.name.endswith("_total")}
    assert finished.get("length", 0) >= 1
    assert sum(s.value for s in families["sparsepd_router_generated_tokens"].samples if s.name.endswith("_total")) >= 3
    assert any(s.name.endswith("_count") and s.value >= 1
               for s in families["sparsepd_router_time_to_first_token_seconds"].samples)
    assert {s.labels["role"] for s in families["sparsepd_worker_pages_in_use"].samples} == {"prefill", "decode"}
    assert "sparsepd_router_queue_length" in families and "sparsepd_router_transfer_bytes" in families
    # each worker's engine forwards by path (eager on the CPU), as of the router's next poll of its Stats
    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(deployment["metrics"], timeout=5) as r:
            families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
        forwards = {(x.labels["role"], x.labels["path"]): x.value for x in families["sparsepd_worker_forwards"].samples
                    if x.name.endswith("_total")}
        if forwards.get(("prefill", "eager"), 0) >= 1 and forwards.get(("decode", "eager"), 0) >= 2:
            break
        assert time.monotonic() < deadline, forwards
        time.sleep(0.2)
    assert {path for _, path in forwards} == {"graph", "prefill_graph", "split", "eager"}, forwards
    assert all(v == 0 for (_, path), v in forwards.items() if path != "eager"), forwards
