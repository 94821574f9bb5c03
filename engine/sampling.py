"""Per-request sampling: greedy, temperature, top-k, top-p, min-p, a seed, min_new_tokens, stop conditions,
log-probabilities.

`SamplingParams` is validated at the edge (a bad value raises `ValueError` naming the field, the value and
the allowed range). `Sampler` owns a request's random generator, seeded from the request's seed, so the
same seed gives the same tokens; its state is a byte string that can be shipped and restored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

FinishReason = Literal["stop", "length"]
MAX_TOP_LOGPROBS = 20


class SamplingParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(0.0, ge=0.0, description="0 = greedy")
    top_k: int = Field(-1, ge=-1, description="-1 or 0 = all tokens")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    min_p: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    max_new_tokens: int = Field(16, ge=1)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_new_tokens: int = Field(0, ge=0)
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("stop_token_ids")
    @classmethod
    def _non_negative(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(t < 0 for t in v):
            raise ValueError(f"stop token ids must be ≥ 0, got {list(v)}")
        return v

    @classmethod
    def checked(cls, **values: object) -> SamplingParams:
        """Build from untrusted values; raise ValueError with every offending field in one message."""
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}={e.get('input')!r}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"invalid sampling parameters: {problems}") from None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0

    def banned(self, n_generated: int, eos_id: int) -> list[int]:
        """Token ids that may not be drawn after n_generated tokens (min_new_tokens not reached yet)."""
        if n_generated >= self.min_new_tokens:
            return []
        return sorted({*self.stop_token_ids, *([] if self.ignore_eos else [eos_id])})


class Sampler:
    """Draws one request's tokens; deterministic for a given seed (or greedy)."""

    def __init__(self, params: SamplingParams, vocab_size: int):
        bad = [t for t in params.stop_token_ids if t >= vocab_size]
        if bad:
            raise ValueError(f"stop token ids {bad} are outside the vocabulary [0, {vocab_size})")
        self.params = params
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed if params.seed is not None else torch.seed() % 2**63)

    def sample(self, logits: torch.Tensor, banned: list[int] | tuple[int, ...] = ()) -> int:
        """One token from logits `[vocab]`, never one of `banned`."""
        p = self.params
        logits = logits.float().cpu()
        if banned:
            logits = logits.clone()
            logits[list(banned)] = float("-inf")
        if p.greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / p.temperature, dim=-1)
        probs = filter_probs(probs, p.top_k, p.top_p, p.min_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def get_state(self) -> bytes:
        return bytes(self.generator.get_state().numpy().tobytes())

    def set_state(self, state: bytes) -> None:
        self.generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))


def filter_probs(probs: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Zero the tokens outside top-k, outside the top-p nucleus, and below min_p · max; renormalise."""
    if top_k > 0:
        kth = torch.topk(probs, min(top_k, probs.shape[-1])).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_p, 0) - sorted_p  # mass of the tokens ranked above
        keep_sorted = before < top_p
        keep = torch.zeros_like(keep_sorted).scatter(0, order, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
    if min_p > 0.0:
        probs = torch.where(probs >= min_p * probs.max(), probs, 0.0)
    return probs / probs.sum()


@dataclass(frozen=True)
class TokenLogprobs:
    """The sampled token's log-probability and the position's most likely tokens with theirs."""

    logprob: float
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


def token_logprobs(logits: torch.Tensor, token: int, top_n: int) -> TokenLogprobs:
    """Log-softmax of one position's raw logits `[vocab]`: `token`'s value and the top_n best (ties: lower id)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    value = float(logp[token])
    if top_n <= 0:
        return TokenLogprobs(value)
    top = torch.topk(logp, min(top_n, logp.shape[-1]))
    return TokenLogprobs(value, tuple(top.indices.tolist()), tuple(float(v) for v in top.values.tolist()))


def finish_reason(token: int, n_generated: int, params: SamplingParams, eos_id: int) -> FinishReason | None:
    """Why generation stops after `token` (the n_generated-th new token), or None to continue."""
    if token in params.stop_token_ids or (token == eos_id and not params.ignore_eos):
        return "stop"
    if n_generated >= params.max_new_tokens:
        return "length"
    return None
