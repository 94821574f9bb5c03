"""A request as the engine tracks it: tokens, sampling, where its state lives, how far it got."""

from __future__ import annotations

from dataclasses import dataclass, field

from sparsepd.engine.grammar import GrammarMatch
from sparsepd.engine.sampling import FinishReason, Sampler, SamplingParams, TokenLogprobs

PENDING = -1  # a token id the host does not know yet: the runner takes it from the device (engine/draw.py)


@dataclass(eq=False)  # identity: the scheduler's lists hold each request once (a generated __eq__ compares fields)
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
    # n > 1: more sequences from this prompt. Each draws its first token from this request's last prompt logits
    # (its own seed) and then runs on its own: a fork with a slot gets a copy of this request's state there; a
    # `stateless` fork (the prefill worker's) only draws, and its state is shipped from this request's.
    forks: list[Request] = field(default_factory=list)
    stateless: bool = False
    keep_on_finish: bool = False  # its slot and pages outlive its finish until the owner releases them (its
    # stateless forks' state is exported from them after the step where it may have drawn its stop token)
    # When params.logprob_start_len = s: those of prompt tokens s+1 … as the prefill scores them
    # (engine/prompt_logprobs.py); complete once the first token is out.
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    grammar: GrammarMatch | None = None  # its grammar's matcher, when params.grammar (engine/grammar.py)
    error: str = ""  # why this request failed alone, when finish_reason == "error"
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache instead of computed
    cache_at: int | None = None  # the last page boundary its prefill snapshots for the prefix cache (not reached yet)
    restored_from: int | None = None  # the key of the prefix-cache node it was restored from
    cache_hashes: list[int] | None = None  # its known tokens' page prefix hashes up to cache_at (sparsepd/prefix_hash)
    captures: tuple[tuple[int, int], ...] = ()  # this forward's boundary snapshots: (boundary, snapshot slot)
    draft_ids: list[int] = field(default_factory=list)  # speculative decoding: its next drafts (engine/speculative.py)
    spec_drafted: int = 0  # speculative decoding: its draft tokens verified so far, and those accepted
    spec_accepted: int = 0
    offloaded: dict | None = None  # retracted: its state's tensors in host memory until it is admitted again
    plain_from: int | None = None  # `plain_draw_from()`, once the scheduler has asked
    # params.uses_history, kept: the penalties' `SlotHistory.bind` reads it for every request in every forward
    uses_history: bool = field(init=False)

    def __post_init__(self) -> None:
        self.uses_history = self.params.uses_history

    @property
    def max_len(self) -> int:
        """Tokens this request may ever hold (its pages grow to them as it decodes)."""
        return len(self.prompt_ids) + self.params.max_new_tokens

    @property
    def num_known(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefilling(self) -> bool:
        """More known tokens to compute than the one a decode step feeds: the prompt, or a resumed request's
        prompt + output (engine.Engine.make_request's output_ids)."""
        # (num_known inlined: this runs for every request in every step)
        n, prompt = self.num_computed, len(self.prompt_ids)
        return n < prompt or n + 1 < prompt + len(self.output_ids)

    def next_tokens(self, budget: int) -> list[int]:
        """The next uncomputed tokens (a prefill chunk of at most `budget`, or the last sampled token)."""
        start, prompt = self.num_computed, len(self.prompt_ids)
        end = min(prompt + len(self.output_ids), start + budget)
        if end <= prompt:  # a chunk of the prompt: no copy of the whole prompt + output
            return self.prompt_ids[start:end]
        if start >= prompt:  # the last output token (a decode step): no copy either
            return self.output_ids[start - prompt: end - prompt]
        return self.prompt_ids[start:] + self.output_ids[: end - prompt]

    def plain_draw_from(self) -> int:
        """The first output position from which this request's draw is a plain argmax (greedy, no penalty, bias,
        grammar or log-probabilities, nothing banned: engine/draw.py's fast path); −1 when never. Its params and
        grammar do not change, so the scheduler keeps the answer (`plain_from`)."""
        p = self.params
        if self.grammar is not None or not p.greedy or p.penalized or p.wants_logprobs:
            return -1
        return p.min_new_tokens if (p.stop_token_ids or not p.ignore_eos) else 0


@dataclass(frozen=True)
class PromptLogprobs:
    """A request's prompt log-probabilities: token `start` has none; `positions[i]` is token start+1+i's."""

    start: int
    positions: tuple[TokenLogprobs, ...]


# Not frozen: one is made for every token, and a frozen __init__ sets each field through object.__setattr__ (1.0 vs
# 0.2 µs a token on a 2-core CPU). Nothing changes one once the scheduler has made it.
@dataclass(slots=True)
class StepOutput:
    """One new token of one request (the terminal one carries its finish reason)."""

    request_id: str
    token: int
    finish_reason: FinishReason | None
    logprobs: TokenLogprobs | None = None  # when the request asked for log-probabilities
    prompt_logprobs: PromptLogprobs | None = None  # with a request's first token, when it asked for them
    error: str = ""  # finish_reason "error": why (the token, -1 or the rejected one, is not part of the output)
    overloaded: bool = False  # finish_reason "error" for want of memory (the worker was full), not the request's fault
    spec_drafted: int = 0  # the terminal output: the request's draft tokens verified and accepted (speculation)
    spec_accepted: int = 0
