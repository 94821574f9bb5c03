"""The decode worker's token messages: each StepBatch's events, filled in place (`_add_event`) from the engine's
StepOutputs or the worker's own TokenUpdates, equal the TokenEvents built field by field, for a running token, a
last one, a failure and one with log-probabilities."""

from __future__ import annotations

from sparsepd.decode_worker.service import _add_event
from sparsepd.decode_worker.worker import TokenUpdate
from sparsepd.engine.request import PromptLogprobs, StepOutput
from sparsepd.engine.sampling import TokenLogprobs
from sparsepd.proto import worker_pb2
from sparsepd.proto.convert import id_logprobs, prompt_logprobs, top_logprobs


def test_step_batch_events_filled_in_place_equal_the_keyword_built_ones():
    lp = TokenLogprobs(-0.5, (3, 4), (-0.5, -1.5), (-2.0,))
    prompt = PromptLogprobs(1, (TokenLogprobs(-1.0, (5,), (-1.0,), (-3.0,)),))
    updates = [TokenUpdate("plain", (7,), ""), TokenUpdate("last", (8,), "length"),
               TokenUpdate("failed", (), "error", "the step failed", error_code=13),
               TokenUpdate("lp", (9,), "stop", logprobs=(lp,), prompt_logprobs=prompt)]
    batch = worker_pb2.StepBatch(step=3)
    for u in updates:
        _add_event(batch.events, u)
    want = worker_pb2.StepBatch(step=3, events=[
        worker_pb2.TokenEvent(request_id="plain", token_ids=[7]),
        worker_pb2.TokenEvent(request_id="last", token_ids=[8], finish_reason="length"),
        worker_pb2.TokenEvent(request_id="failed", finish_reason="error", error="the step failed", error_code=13),
        worker_pb2.TokenEvent(request_id="lp", token_ids=[9], finish_reason="stop", logprobs=[-0.5],
                              top_logprobs=[top_logprobs((3, 4), (-0.5, -1.5))],
                              token_ids_logprobs=[id_logprobs((-2.0,))],
                              prompt_logprobs=prompt_logprobs(1, prompt.positions))])
    assert batch == want
    assert worker_pb2.StepBatch.FromString(batch.SerializeToString()) == want


def test_engine_step_outputs_fill_the_same_events_as_updates():
    lp = TokenLogprobs(-0.5, (3, 4), (-0.5, -1.5), (-2.0,))
    prompt = PromptLogprobs(1, (TokenLogprobs(-1.0, (5,), (-1.0,), (-3.0,)),))
    outputs = [StepOutput("plain", 7, None), StepOutput("last", 8, "length", spec_drafted=6, spec_accepted=4),
               StepOutput("lp", 9, "stop", logprobs=lp, prompt_logprobs=prompt)]
    updates = [TokenUpdate("plain", (7,), ""), TokenUpdate("last", (8,), "length", spec_draft_tokens=6,
                                                          spec_accepted_tokens=4),
               TokenUpdate("lp", (9,), "stop", logprobs=(lp,), prompt_logprobs=prompt)]
    got, want = worker_pb2.StepBatch(step=1), worker_pb2.StepBatch(step=1)
    for o, u in zip(outputs, updates, strict=True):
        _add_event(got.events, o)
        _add_event(want.events, u)
    assert got == want
    assert [e.token_ids[0] for e in got.events] == [7, 8, 9]
