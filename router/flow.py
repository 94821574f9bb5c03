"""One request in flight through the router: where it is, what it produced, and how it ended.

The dispatcher writes a flow's events (`("tokens", [ids])` as tokens arrive, then exactly one
`("end", Outcome)`); the public Generate stream reads them. `take` applies the router's own stop rules to
a step's new tokens: stop strings (per token over the incrementally decoded text, `check_stop`; none before
`min_new_tokens`) and max_new_tokens (a slice when there is no stop string). Stop token ids and EOS are the
workers' (they mask them until `min_new_tokens`). A flow whose worker is lost is moved (`move`): what it
produced stays, and its next attempt resumes after it under another id (`worker_id`). Where a flow is is its
`stage` (router/stage.py), changed only by `to`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc

from sparsepd.proto import worker_pb2
from sparsepd.router.params import RequestSpec
from sparsepd.router.stage import HOLDS_DECODE, Stage, allowed
from sparsepd.router.text import StopStrings

log = logging.getLogger("sparsepd.router")


@dataclass(frozen=True)
class Outcome:
    finish_reason: str  # "stop", "length" or "abort" (ignored when `code` is set)
    matched_token_id: int | None = None
    matched_stop_str: str | None = None
    code: grpc.StatusCode | None = None  # the request failed with this status
    message: str = ""


def worker_error_status(error_code: int) -> grpc.StatusCode:
    """The status a request failed by a worker ends with: the worker's `error_code` when it names the request
    itself (INVALID_ARGUMENT, INTERNAL, RESOURCE_EXHAUSTED: the decode worker's memory for retracted requests was
    full), else UNAVAILABLE (a transfer or a worker failed: worth a retry)."""
    named = {grpc.StatusCode.INVALID_ARGUMENT.value[0]: grpc.StatusCode.INVALID_ARGUMENT,
             grpc.StatusCode.INTERNAL.value[0]: grpc.StatusCode.INTERNAL,
             grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]: grpc.StatusCode.RESOURCE_EXHAUSTED}
    return named.get(error_code, grpc.StatusCode.UNAVAILABLE)


@dataclass(frozen=True)
class TokenLogprob:
    logprob: float
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()
    ids_logprobs: tuple[float, ...] = ()  # at spec.token_ids_logprob, in its order


@dataclass(eq=False)
class Flow:
    spec: RequestSpec
    stopper: StopStrings | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    admitted_at: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token when spec.logprobs
    prompt_logprobs: worker_pb2.PromptLogprobs | None = None  # when spec.logprob_start_len is set
    prefill: object = None  # WorkerHandle
    decode: object = None  # WorkerHandle
    stage: Stage = Stage.QUEUED  # changed only by `to`
    early: list = field(default_factory=list)  # decode events that came while PREFILLING (before the first token)
    outcome: Outcome | None = None
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    cached_tokens: int = 0  # prompt tokens the prefill worker restored from its prefix cache (first attempt)
    prefix_hashes: list[int] | None = None  # its prompt's page-aligned prefixes (sparsepd/prefix_hash.py), once
    transfer_ms: float = 0.0
    ttft_ms: float = 0.0
    transfer_bytes: int = 0
    spec_draft_tokens: int = 0  # speculative decoding: from the decode worker's terminal event
    spec_accepted_tokens: int = 0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    stream_interval: int = 1  # tokens handed to the stream at a time after the first (`hand_over`)
    held: list[int] = field(default_factory=list)  # taken, not handed to the stream yet (stream_interval > 1)
    group: list[Flow] | None = None  # n > 1: every choice's flow (this one included), prefilled once together
    attempt: int = 0  # times it was moved to other workers after one was lost (dispatch's _migrate)
    first_early: bool = False  # this attempt's first token came before its prefill's result (PrefillStream)
    lost: str = ""  # why it was last moved

    def to(self, stage: Stage) -> bool:
        """Move to `stage` if router/stage.py's table allows it from the current one; else refuse, log the
        violation with the request id and return False (the flow stays where it is)."""
        if not allowed(self.stage, stage):
            log.error("illegal stage transition %s -> %s refused (attempt %d)", self.stage.value, stage.value,
                      self.attempt, extra={"request_id": self.request_id})
            return False
        self.stage = stage
        return True

    @property
    def ended(self) -> bool:
        return self.stage is Stage.ENDED

    @property
    def reserved(self) -> bool:
        """Pages and a slot held on `decode`."""
        return self.stage in HOLDS_DECODE

    @property
    def prefill_inflight(self) -> bool:
        return self.stage is Stage.PREFILLING

    @property
    def first_known(self) -> bool:
        """The prefill's result came: DECODING. (A first token PrefillStream sent ahead of that result is delivered
        while the flow is still PREFILLING: see `first_early`.)"""
        return self.stage is Stage.DECODING

    @first_known.setter
    def first_known(self, known: bool) -> None:  # (the same checked change as to(DECODING) / to(QUEUED))
        self.to(Stage.DECODING if known else Stage.QUEUED)

    @property
    def worker_id(self) -> str:
        """The id the workers know this attempt by: the request id, then `<id>@<attempt>` once moved (a lost
        worker that comes back, or a late answer of the old attempt, can never be taken for the new one)."""
        return self._worker_id(self.attempt)

    @property
    def next_worker_id(self) -> str:
        """The id the workers would know the next attempt by, once moved."""
        return self._worker_id(self.attempt + 1)

    def _worker_id(self, attempt: int) -> str:
        return self.request_id if attempt == 0 else f"{self.request_id}@{attempt}"

    @property
    def prefill_len(self) -> int:
        """Tokens its next prefill computes: the prompt, and once moved the tokens produced so far."""
        return len(self.spec.input_ids) + (len(self.output_ids) if self.attempt else 0)

    @property
    def prefill_members(self) -> list[Flow]:
        """The flows one PrefillRequest carries for this one: its group on the first attempt; alone once moved
        (each choice resumes from its own tokens)."""
        return self.members if self.attempt == 0 else [self]

    def move(self, why: str) -> None:
        """Forget the workers of this attempt (the caller moved it back to QUEUED, which released what they
        held): the next attempt prefills the prompt and the tokens produced so far, and continues them elsewhere."""
        self.attempt, self.lost = self.attempt + 1, why
        self.prefill = self.decode = None
        self.early.clear()
        self.first_early = False

    @property
    def request_id(self) -> str:
        return self.spec.request_id

    @property
    def members(self) -> list[Flow]:
        """The flows prefilled together with this one: its group, or itself."""
        return self.group if self.group is not None else [self]

    def failure_message(self, why: str) -> str:
        """A failure's message, with why the flow was moved before when it was."""
        return f"{self.lost}; then {why}" if self.lost else why

    def check_stop(self, token: int) -> Outcome | None:
        """Whether `token`, just appended to output_ids, ends the request (the router's rules)."""
        spec, n = self.spec, len(self.output_ids)
        matched = self.stopper.push(token) if self.stopper is not None else None
        if n < spec.min_new_tokens:  # SGLang checks nothing before min_new_tokens
            if matched is not None:
                self.stopper.forget()
            return None
        if matched is not None:
            return Outcome("stop", matched_stop_str=matched)
        if n >= spec.max_new_tokens:
            return Outcome("length")
        return None

    def take(self, token_ids: list[int],
             logprobs: list[TokenLogprob] | None = None) -> tuple[list[int], Outcome | None]:
        """Append new tokens up to the one that ends the request: those taken, and the outcome if one ends it.

        With stop strings every token is checked on the decoded text; without, only max_new_tokens can end
        it here, so the tokens are taken as one slice and decoded once at the end."""
        if self.stopper is not None and self.stopper.stops:
            new, outcome = [], None
            for i, token in enumerate(token_ids):
                self.output_ids.append(token)
                if logprobs is not None:
                    self.logprobs.append(logprobs[i])
                new.append(token)
                outcome = self.check_stop(token)
                if outcome is not None:
                    break
            return new, outcome
        new = token_ids[:self.spec.max_new_tokens - len(self.output_ids)]
        self.output_ids.extend(new)
        if logprobs is not None:
            self.logprobs.extend(logprobs[:len(new)])
        if self.stopper is not None:
            self.stopper.extend(new)
        return new, Outcome("length") if len(self.output_ids) >= self.spec.max_new_tokens else None

    def hand_over(self, new: list[int], first: bool) -> None:
        """Put newly taken tokens on the stream's events: at once when they hold the first token or the interval
        is 1, else once `stream_interval` have gathered (one event, one chunk and one wake-up of the stream per
        interval instead of per step: the router's cost per token falls with the messages; `hand_over_held`
        sends the rest before the end)."""
        if first or self.stream_interval == 1:
            self.events.put_nowait(("tokens", new))
            return
        self.held.extend(new)
        if len(self.held) >= self.stream_interval:
            self.hand_over_held()

    def hand_over_held(self) -> None:
        if self.held:
            self.events.put_nowait(("tokens", self.held))
            self.held = []

    def worker_outcome(self, finish_reason: str) -> Outcome:
        """The outcome a worker's finish reason ("stop" or "length") means for the last token."""
        last = self.output_ids[-1] if self.output_ids else None
        if finish_reason == "stop" and last is not None:
            return Outcome("stop", matched_token_id=last)
        return Outcome(finish_reason)

    def output_text(self) -> str | None:
        """The text of the output (trimmed at a matched stop string unless no_stop_trim), if it was decoded."""
        return self.stopper.output_text(self.spec.no_stop_trim) if self.stopper is not None else None
