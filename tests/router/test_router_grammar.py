"""Structured output through the real service (router + prefill + decode processes): the first token sampled
by the prefill worker and the rest by the decode worker (whose matcher replays the first) match the grammar
and equal the single-process reference; a bad grammar of each kind is INVALID_ARGUMENT with the compiler's
message before any worker does work; aborting a grammar request mid-stream frees everything; and through the
SGLang gateway with the official openai client, `response_format` json_schema and json_object."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import grpc
import jsonschema
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from router_helpers import channel, collect, generate_request, run, stub_of, wait_all_free  # noqa: E402

from sparsepd.deploy.launch import stop  # noqa: E402
from sparsepd.engine.generate import generate  # noqa: E402
from sparsepd.engine.sampling import SamplingParams  # noqa: E402
from sparsepd.grammar import Grammar, Grammars, Vocabulary  # noqa: E402
from sparsepd.model.weights import build_model  # noqa: E402
from sparsepd.model_config import get_preset  # noqa: E402
from sparsepd.proto import sglang_scheduler_pb2 as pb  # noqa: E402

xgr = pytest.importorskip("xgrammar")
EOS = 257
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 1,
                                                                          "maximum": 3}}, "required": ["ok", "n"]}
REGEX, EBNF = "[a-z]{2,4}-(x|y)", 'root ::= "yes" | "no" | "maybe " [0-9]'


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny"), seed=0)


def _accepted(kind: str, text: str, tokens: list[int]) -> bool:
    """A fresh matcher accepts every token and ends terminated."""
    matcher = xgr.GrammarMatcher(Grammars(Vocabulary(vocab_size=260, eos_id=EOS)).compile(Grammar(kind=kind,
                                                                                                   text=text)))
    return all(matcher.accept_token(t) for t in tokens) and matcher.is_terminated()


def test_grammar_requests_through_the_service_match_and_equal_the_reference(deployment, model):
    prompt = [256, *b"json"]
    # (generate_request sets ignore_eos: a grammar's end still stops the request, engine/grammar.py)
    requests = [generate_request(prompt, 40, stream=True, request_id="json", json_schema=json.dumps(SCHEMA)),
                generate_request(prompt, 40, request_id="regex", regex=REGEX),
                generate_request(prompt, 40, stream=True, request_id="ebnf", ebnf_grammar=EBNF)]
    requests[2].sampling_params.temperature, requests[2].sampling_params.seed = 0.8, 9  # a sampled row

    async def main():
        async with channel(deployment["router"]) as ch:
            stub = stub_of(ch)
            results = await asyncio.gather(*[collect(stub, r) for r in requests])
            await wait_all_free(stub)
            return results

    (chunks, json_done), (_, regex_done), (_, ebnf_done) = run(main())
    ids = list(json_done.output_ids)
    assert json_done.finish_reason == "stop" and ids[-1] == EOS and json_done.matched_token_id == EOS
    assert [t for c in chunks for t in c.token_ids] == ids
    jsonschema.validate(json.loads(bytes(ids[:-1])), SCHEMA)
    want = generate(model, prompt, SamplingParams(max_new_tokens=40, grammar=Grammar(kind="json_schema",
                                                                                      text=json.dumps(SCHEMA))))
    assert ids == want.output_ids
    assert _accepted("regex", REGEX, list(regex_done.output_ids)) and regex_done.finish_reason == "stop"
    assert _accepted("ebnf", EBNF, list(ebnf_done.output_ids)) and ebnf_done.finish_reason == "stop"
    sampled = SamplingParams(max_new_tokens=40, temperature=0.8, seed=9, ignore_eos=True,
                             grammar=Grammar(kind="ebnf", text=EBNF))
    assert list(ebnf_done.output_ids) == generate(model, prompt, sampled).output_ids


BAD = [({"json_schema": '{"type": "objectx"}'}, 'sampling_params.json_schema: json_schema does not compile: '
                                               'Unsupported type "objectx"'),
       ({"json_schema": "{not json"}, "Failed to parse JSON"),
       ({"regex": "[a-z"}, "sampling_params.regex: regex does not compile: Regex parsing error"),
       ({"ebnf_grammar": "root ::= foo"}, 'sampling_params.ebnf_grammar: ebnf does not compile: EBNF parser error at '
                                          'line 1, column 10: Rule "foo" is not defined'),
       ({"structural_tag": "{}"}, "sampling_params.structural_tag: structural_tag does not compile"),
       ({"regex": "  "}, "sampling_params.regex has 2 characters: expected a non-empty grammar")]


def test_a_bad_grammar_is_invalid_argument_with_the_compilers_message(deployment):
    async def main():
        async with channel(deployment["router"]) as ch:
            stub = stub_of(ch)
            errors = []
            for i, (constraint, _) in enumerate(BAD):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await collect(stub, generate_request([256, 1, 2], 8, request_id=f"bad-{i}", **constraint))
                errors.append(err.value)
            loads = await wait_all_free(stub)
            return errors, loads

    errors, loads = run(main())
    for err, (constraint, needle) in zip(errors, BAD, strict=True):
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.details(), (constraint, err.details())
    assert all(x.free_pages == x.num_pages and x.free_slots == x.num_slots for x in loads.loads)


def test_abort_of_a_grammar_request_mid_stream_frees_everything(deployment):
    async def main():
        async with channel(deployment["router"]) as ch:
            stub = stub_of(ch)
            call = stub.Generate(generate_request([256, *b"abort"], 300, stream=True, request_id="grammar-abort",
                                                  regex="[a-z]{300}"))
            first = await call.read()
            reply = await stub.Abort(pb.AbortRequest(request_id="grammar-abort"))
            rest = []
            while (response := await call.read()) != grpc.aio.EOF:
                rest.append(response)
            await wait_all_free(stub)
            return first, reply, rest

    first, reply, rest = run(main())
    assert first.HasField("chunk") and reply.success
    done = rest[-1].complete
    assert done.finish_reason == "abort" and 1 <= len(done.output_ids) < 300
    assert all(97 <= t <= 122 for t in done.output_ids)


# --- through the SGLang gateway (smg) with the openai client -----------------------------------------------
@pytest.fixture(scope="module")
def gateway(deployment):
    pytest.importorskip("smg", reason="the gateway test needs the http extra: pip install 'sparsepd[http]'")
    openai = pytest.importorskip("openai")
    from sparsepd.deploy.serve import start_gateway

    child = start_gateway(deployment["router"], 0, timeout_s=120)
    try:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{child.ready['port']}/v1", api_key="unused", max_retries=0,
                            timeout=120)
    finally:
        stop(child)


def test_openai_response_format_through_the_gateway(gateway, deployment):
    """smg 1.13 turns chat `response_format` {json_schema} into sampling_params.json_schema and {json_object}
    into the schema {"type": "object"} (observed); on /v1/completions it drops `response_format`, where the
    top-level `json_schema`, `regex` and `ebnf` extras are carried instead."""
    model = gateway.models.list().data[0].id
    chat = gateway.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Answer in JSON."}], max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}})
    assert chat.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(chat.choices[0].message.content), SCHEMA)
    loose = gateway.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Any JSON object."}], max_tokens=3, temperature=0,
        response_format={"type": "json_object"})
    assert loose.choices[0].message.content.startswith("{")
    text = gateway.completions.create(model=model, prompt="yes or no?", max_tokens=10, temperature=0,
                                      extra_body={"ebnf": EBNF})
    assert text.choices[0].text in ("yes", "no") or text.choices[0].text.startswith("maybe ")
    assert text.choices[0].finish_reason == "stop"

    async def free():
        async with channel(deployment["router"]) as ch:
            await wait_all_free(stub_of(ch))

    run(free())
