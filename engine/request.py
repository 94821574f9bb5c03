"""A request as the engine tracks it: tokens, sampling, where its state lives, how far it got."""

from __future__ import annotations

from dataclasses import dataclass, field

from sparsepd.engine.sampling import FinishReason, Sampler, SamplingParams, TokenLogprobs

PENDING = -1  # a token id the host does not know yet: the runner takes it from the device (engine/draw.py)


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sampler: Sampler
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the pools (= the position of the next token to feed)
    finish_reason: FinishReason | None = None
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per output token, when asked for
    num_pending: int = 0  # tokens sampled on the GPU whose values the host has not read yet (overlap)
    error: str = ""  # why this request failed alone (its finish reason becomes "error")

    @property
    def max_len(self) -> int:
        """Tokens this request may ever hold: its pages are reserved for all of them at admission."""
        return len(self.prompt_ids) + self.params.max_new_tokens

    @property
    def num_known(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefilling(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    def next_tokens(self, budget: int) -> list[int]:
        """The next uncomputed tokens (a prefill chunk of at most `budget`, or the last sampled token)."""
        known = self.prompt_ids + self.output_ids
        return known[self.num_computed: min(self.num_known, self.num_computed + budget)]


@dataclass(frozen=True)
class StepOutput:
    """One new token of one request (the terminal one carries its finish reason)."""

    request_id: str
    token: int
    finish_reason: FinishReason | None
    logprobs: TokenLogprobs | None = None  # when the request asked for log-probabilities
    error: str = ""  # with finish reason "error": what failed (the token is then -1)
