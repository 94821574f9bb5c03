"""Helpers for the log-probability tests through the service: the single-process reference, requests that ask
for the prompt's and chosen ids' log-probabilities, and checks of SGLang's InputLogProbs / OutputLogProbs."""

from __future__ import annotations

from router_helpers import generate_request

from sparsepd.engine.generate import Generation, generate
from sparsepd.engine.sampling import SamplingParams
from sparsepd.proto import sglang_scheduler_pb2 as pb

TOP = 2
IDS = [5, 200]  # token_ids_logprob


def reference(model, ids: list[int], max_new: int) -> Generation:
    """generate() from the first prompt token with top TOP and IDS: any start's values are a suffix of these."""
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True, logprobs=True, top_logprobs=TOP,
                            token_ids_logprob=tuple(IDS), logprob_start_len=0)
    return generate(model, ids, params)


def logprob_request(ids: list[int], max_new: int, start: int, top: int = 0, token_ids: list[int] = (),
                    stream: bool = False, request_id: str = "") -> pb.GenerateRequest:
    request = generate_request(ids, max_new, stream=stream, request_id=request_id)
    request.return_logprob, request.logprob_start_len, request.top_logprobs_num = True, start, top
    request.token_ids_logprob.extend(token_ids)
    return request


def assert_close(got: list[float], want: list[float], where: str) -> None:
    """Relative error ≤ 1e-5 (tiny runs in fp32; the paged engine and the plain model round differently)."""
    assert len(got) == len(want), (where, len(got), len(want))
    worst = max([abs(g - w) / abs(w) for g, w in zip(got, want, strict=True)], default=0.0)
    assert worst <= 1e-5, f"{where}: worst relative error {worst}"


def check_input(lp: pb.InputLogProbs, ids: list[int], start: int, top: int, token_ids: list[int], ref: Generation):
    """Input tokens start … L-1; the first without a value (and empty top and ids entries), the rest the
    reference's."""
    want = ref.prompt_logprobs.positions[start:]  # tokens start+1 … L-1
    assert list(lp.token_ids) == ids[start:] and len(lp.token_logprobs) == len(ids) - start
    assert not lp.token_logprobs[0].HasField("value") and all(x.HasField("value") for x in lp.token_logprobs[1:])
    assert_close([x.value for x in lp.token_logprobs[1:]], [w.logprob for w in want], "input logprobs")
    assert len(lp.top_logprobs) == (len(ids) - start if top else 0)
    if top:
        assert lp.top_logprobs[0] == pb.TopLogProbs()
        assert [tuple(x.token_ids) for x in lp.top_logprobs[1:]] == [w.top_ids[:top] for w in want]
        assert_close([v for x in lp.top_logprobs[1:] for v in x.values],
                     [v for w in want for v in w.top_logprobs[:top]], "input top logprobs")
    assert len(lp.token_ids_logprobs) == (len(ids) - start if token_ids else 0)
    if token_ids:
        assert lp.token_ids_logprobs[0] == pb.TopLogProbs()
        assert all(list(x.token_ids) == list(token_ids) for x in lp.token_ids_logprobs[1:])
        assert_close([v for x in lp.token_ids_logprobs[1:] for v in x.values],
                     [v for w in want for v in w.ids_logprobs], "input token_ids_logprobs")


def check_output(lp: pb.OutputLogProbs, top: int, token_ids: list[int], ref: Generation) -> None:
    assert list(lp.token_ids) == ref.output_ids
    assert_close(list(lp.token_logprobs), [w.logprob for w in ref.logprobs], "output logprobs")
    assert [tuple(x.token_ids) for x in lp.top_logprobs] == ([w.top_ids[:top] for w in ref.logprobs] if top else [])
    assert len(lp.token_ids_logprobs) == (len(ref.output_ids) if token_ids else 0)
    if token_ids:
        assert all(list(x.token_ids) == list(token_ids) for x in lp.token_ids_logprobs)
        assert_close([v for x in lp.token_ids_logprobs for v in x.values],
                     [v for w in ref.logprobs for v in w.ids_logprobs], "output token_ids_logprobs")


def check_streamed(chunks: list[pb.GenerateStreamChunk], done: pb.GenerateComplete) -> None:
    """SGLang puts the input log-probabilities in the first chunk and the complete, nowhere else."""
    assert chunks and chunks[0].input_logprobs == done.input_logprobs and done.HasField("input_logprobs")
    assert not any(c.HasField("input_logprobs") for c in chunks[1:])
    assert [t for c in chunks for t in c.token_ids] == list(done.output_ids)
