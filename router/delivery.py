"""Token delivery: a worker's tokens (the prefill worker's first, then the decode worker's steps) onto a flow's
event stream, through the router's own stop rules (`Flow.take`), with their log-probabilities checked against
the request; says which outcome, if any, ends the flow. Ending it is the dispatcher's (router/dispatch.py).
"""

from __future__ import annotations

import time

import grpc

from sparsepd.proto import worker_pb2
from sparsepd.router.flow import Flow, Outcome, TokenLogprob


def deliver(flow: Flow, token_ids: list[int], worker_finish: str, logprobs: list[TokenLogprob] | None = None,
            metrics=None) -> Outcome | None:
    """Put the tokens the flow takes on its stream; the outcome that ends it (a stop rule, the worker's finish
    reason, or a worker's answer that does not fit the request), else None."""
    if logprobs is not None and len(logprobs) != len(token_ids):
        return Outcome("abort", code=grpc.StatusCode.INTERNAL,
                       message=f"worker sent {len(logprobs)} log-probabilities for {len(token_ids)} tokens")
    first = not flow.output_ids  # these tokens begin its output
    problem = prompt_logprobs_problem(flow) if token_ids and first else None
    if problem is not None:
        return Outcome("abort", code=grpc.StatusCode.INTERNAL, message=problem)
    if token_ids and first:
        flow.ttft_ms = (time.monotonic() - flow.admitted_at) * 1e3
        if metrics:
            metrics.first_token(flow.ttft_ms / 1e3)
    new, outcome = flow.take(token_ids, logprobs)
    if outcome is None and worker_finish:
        outcome = flow.worker_outcome(worker_finish)
    now = time.monotonic()
    gap_s = now - flow.last_token_at if flow.last_token_at else None  # since its previous tokens (metrics)
    flow.first_token_at = flow.first_token_at or now
    flow.last_token_at = now
    if new:
        flow.hand_over(new, first)
        if metrics:
            metrics.generated(len(new), gap_s)
    return outcome


def first_token_logprobs(r: worker_pb2.PrefillResult) -> list[TokenLogprob]:
    """The log-probabilities of the first token a prefill worker sampled."""
    return [TokenLogprob(r.first_logprob, tuple(r.first_top_logprobs.token_ids), tuple(r.first_top_logprobs.logprobs),
                         tuple(r.first_token_ids_logprobs.logprobs))]


def event_logprobs(event: worker_pb2.TokenEvent) -> list[TokenLogprob]:
    """The log-probabilities of an event's tokens (their token-id values when the request named ids)."""
    ids = [tuple(x.logprobs) for x in event.token_ids_logprobs] or [()] * len(event.logprobs)
    tops = list(event.top_logprobs) or [worker_pb2.TopLogprobs()] * len(event.logprobs)
    return [TokenLogprob(lp, tuple(top.token_ids), tuple(top.logprobs), i)
            for lp, top, i in zip(event.logprobs, tops, ids, strict=False)]


def prompt_logprobs_problem(flow: Flow) -> str | None:
    """Why the prompt log-probabilities a worker sent before the first token do not fit the request, if so."""
    spec, got = flow.spec, flow.prompt_logprobs
    if spec.logprob_start_len is None:
        return None
    want = len(spec.input_ids) - 1 - spec.logprob_start_len
    if got is None or got.start != spec.logprob_start_len or len(got.logprobs) != want:
        return (f"the worker's prompt log-probabilities do not fit the request: expected {want} values from "
                f"position {spec.logprob_start_len}, got "
                + ("none" if got is None else f"{len(got.logprobs)} from position {got.start}"))
    if (spec.top_logprobs and len(got.top_logprobs) != want) or (
            spec.token_ids_logprob and len(got.token_ids_logprobs) != want):
        return (f"the worker's prompt log-probabilities lack the top ones or the token ids' ({len(got.top_logprobs)} "
                f"and {len(got.token_ids_logprobs)} of {want})")
    return None
