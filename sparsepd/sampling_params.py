"""Sampling parameters: what a request may ask of the draw, defined and validated once (docs/DESIGN.md §2, §3).

`SamplingParams` is the one model of them. The router builds it from a public request (router/params.py, which
refuses a bad value naming the public field before it builds one), the workers from the worker-control message
(proto/convert.py), and the engine and the kernels trust it after. `BOUNDS` states each numeric parameter's
allowed values once: the model's constraints, the router's messages and the workers' come from it.

Semantics (SGLang's): a temperature below SAMPLING_EPS is greedy; top_k -1 or 0 is off; top_p in (0, 1];
min_p in [0, 1); frequency and presence penalties in [-2, 2]; repetition_penalty > 0 (1 = off); logit_bias
maps token ids to a bias in [-100, 100] (OpenAI's bound); min_new_tokens bans EOS and the stop ids until that
many tokens were drawn; log-probabilities of the output (`logprobs`), its `top_logprobs` most likely tokens
(≤ 20), `token_ids_logprob` (≤ 64 ids) and the prompt's from `logprob_start_len`; a grammar for structured
output. proto3 cannot tell 0 from unset: `unset_zero` gives the fields whose 0 on the wire means "off" their
default, for every message that carries them.

Which ids exist is the model's business: `check_vocabulary` checks the ids a request names against a vocabulary
size, where one is known (the engine's sampler, the router's model card).

Torch-free: the router and the clients import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sparsepd.grammar import Grammar

SAMPLING_EPS = 1e-6  # a temperature below this is greedy (SGLang's _SAMPLING_EPS)
MAX_TOP_LOGPROBS = 20  # most likely tokens a request may ask the log-probabilities of, per position
MAX_TOKEN_IDS_LOGPROB = 64  # ids a request may ask the log-probabilities of (token_ids_logprob)
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on a logit_bias value


@dataclass(frozen=True)
class Bound:
    """A numeric parameter's allowed values: finite and within the limits given (ge ≤ v, gt < v, v ≤ le, v < lt);
    `allowed` says so in words, for the messages."""

    allowed: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def admits(self, value: float) -> bool:
        return (math.isfinite(value) and (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def error(self, name: str, value: float) -> str:
        """`name=value is out of range: allowed …`, the value as given (a float in %g)."""
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        return f"{name}={shown} is out of range: allowed {self.allowed}"

    def field(self, default: Any, **kwargs: Any) -> Any:
        """The pydantic Field of a parameter with this bound (a float one also refuses inf and NaN)."""
        limits = {k: v for k in ("ge", "gt", "le", "lt") if (v := getattr(self, k)) is not None}
        if isinstance(default, float):
            limits["allow_inf_nan"] = False
        return Field(default, **limits, **kwargs)


BOUNDS: dict[str, Bound] = {
    "temperature": Bound("finite and ≥ 0 (below 1e-6 = greedy)", ge=0.0),
    "top_k": Bound("-1 or 0 (off) or ≥ 1", ge=-1, lt=2**31),
    "top_p": Bound("in (0, 1]", gt=0.0, le=1.0),
    "min_p": Bound("in [0, 1)", ge=0.0, lt=1.0),
    "seed": Bound(f"0..{2**63 - 1}", ge=0, lt=2**63),
    "max_new_tokens": Bound("≥ 1", ge=1),
    "min_new_tokens": Bound("≥ 0", ge=0),
    "top_logprobs": Bound(f"0..{MAX_TOP_LOGPROBS}", ge=0, le=MAX_TOP_LOGPROBS),
    "frequency_penalty": Bound("in [-2, 2]", ge=-2.0, le=2.0),
    "presence_penalty": Bound("in [-2, 2]", ge=-2.0, le=2.0),
    "repetition_penalty": Bound("> 0 (1 = off; 0 = unset)", gt=0.0),
    "logit_bias": Bound(f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]", ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS),
    "logprob_start_len": Bound("≥ 0 and < the prompt length", ge=0),
}

# proto3 cannot tell 0 from unset: on the wire, these fields' 0 means their default (off).
ZERO_IS_UNSET = {"top_p": 1.0, "repetition_penalty": 1.0}


def unset_zero(name: str, value: float) -> float:
    """A field's value as a proto3 message carries it, its 0 read as unset where that is the rule."""
    return ZERO_IS_UNSET[name] if value == 0 and name in ZERO_IS_UNSET else value


class SamplingParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = BOUNDS["temperature"].field(0.0, description=f"below {SAMPLING_EPS:g} = greedy")
    top_k: int = BOUNDS["top_k"].field(-1, description="-1 or 0 = all tokens")
    top_p: float = BOUNDS["top_p"].field(1.0)
    min_p: float = BOUNDS["min_p"].field(0.0)
    seed: int | None = BOUNDS["seed"].field(None)
    max_new_tokens: int = BOUNDS["max_new_tokens"].field(16)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_new_tokens: int = BOUNDS["min_new_tokens"].field(0)
    logprobs: bool = False
    top_logprobs: int = BOUNDS["top_logprobs"].field(0)
    frequency_penalty: float = BOUNDS["frequency_penalty"].field(0.0)
    presence_penalty: float = BOUNDS["presence_penalty"].field(0.0)
    repetition_penalty: float = BOUNDS["repetition_penalty"].field(1.0, description="1 = off")
    logit_bias: tuple[tuple[int, float], ...] = Field((), description="(token id, bias) pairs, ids distinct")
    token_ids_logprob: tuple[int, ...] = Field((), max_length=MAX_TOKEN_IDS_LOGPROB,
                                               description="report these ids' log-probabilities too, in this order")
    logprob_start_len: int | None = BOUNDS["logprob_start_len"].field(
        None, description="prompt log-probabilities from this position (None: none); must be < the prompt length")
    grammar: Grammar | None = Field(None, description="structured output: the tokens must match it")

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: tuple[tuple[int, float], ...]) -> tuple[tuple[int, float], ...]:
        ids = [i for i, _ in v]
        if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"logit_bias token ids must be distinct and ≥ 0, got {ids}")
        bad = [(i, b) for i, b in v if not BOUNDS["logit_bias"].admits(b)]  # NaN fails too
        if bad:
            raise ValueError(f"logit_bias values must lie in {BOUNDS['logit_bias'].allowed}, got {bad}")
        return v

    @field_validator("stop_token_ids", "token_ids_logprob")
    @classmethod
    def _non_negative(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(t < 0 for t in v):
            raise ValueError(f"token ids must be ≥ 0, got {list(v)}")
        return v

    @classmethod
    def checked(cls, **values: object) -> SamplingParams:
        """Build from untrusted values; raise ValueError with every offending field in one message (a bounded
        field's in BOUNDS' words)."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ValueError(f"invalid sampling parameters: {'; '.join(map(_problem, exc.errors()))}") from None

    def check_vocabulary(self, vocab_size: int) -> None:
        """ValueError when an id the request names (a stop id, a logit_bias or token_ids_logprob id) is not in
        [0, vocab_size)."""
        for what, ids in (("stop token ids", self.stop_token_ids), ("logit_bias token ids", [i for i, _ in
                                                                                           self.logit_bias]),
                          ("token_ids_logprob ids", self.token_ids_logprob)):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise ValueError(f"{what} {bad} are outside the vocabulary [0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    @property
    def uses_history(self) -> bool:
        """Whether the draw depends on the tokens seen so far (a frequency, presence or repetition penalty)."""
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def penalized(self) -> bool:
        """Whether the logits change before the draw (a penalty or a logit bias)."""
        return self.uses_history or bool(self.logit_bias)

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0 or bool(self.token_ids_logprob)

    def banned(self, n_generated: int, eos_id: int) -> list[int]:
        """Token ids that may not be drawn after n_generated tokens (min_new_tokens not reached yet)."""
        if n_generated >= self.min_new_tokens:
            return []
        return sorted({*self.stop_token_ids, *([] if self.ignore_eos else [eos_id])})


def _problem(error: dict) -> str:
    """One validation error as `field=value: why`, a bounded field's number out of its bound in BOUNDS' words."""
    loc = error["loc"]
    name, value = ".".join(str(p) for p in loc), error.get("input")
    bound = BOUNDS.get(str(loc[0])) if len(loc) == 1 else None
    if bound is not None and isinstance(value, int | float) and not isinstance(value, bool) and not bound.admits(value):
        return bound.error(name, value)
    return f"{name}={value!r}: {error['msg']}"
