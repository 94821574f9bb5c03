"""Per-request sampling: greedy, temperature, top-k, top-p, min-p, a seed, min_new_tokens, stop conditions,
log-probabilities (of the output, of chosen token ids, and of the prompt: engine/prompt_logprobs.py),
frequency/presence/repetition penalties, a logit bias and a grammar (structured output: engine/grammar.py).

`SamplingParams` is validated at the edge (a bad value raises `ValueError` naming the field, the value and the
allowed range). Penalties and bias change the logits before the draw (kernels/sampling.py's
`apply_penalties`); the engine keeps each slot's token counts on the device (engine/penalties.py). The draw
itself is `kernels/sampling.py` (batched, on the device, counter-based random stream): `Sampler` draws one
request's tokens with it on the CPU and holds the request's seed and how many tokens it drew (a 16-byte state
that can be shipped and restored); `sampling_tensors` builds the batched path's inputs. The same seed gives
the same tokens on either path, whatever the batch.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sparsepd.grammar import Grammar
from sparsepd.kernels.sampling import (
    MAX_TOP_LOGPROBS,
    SAMPLING_EPS,
    SampleOutput,
    SamplingTensors,
    apply_penalties_row,
    filter_probs,
    sample_batch,
)

__all__ = ["MAX_TOKEN_IDS_LOGPROB", "MAX_TOP_LOGPROBS", "SAMPLING_EPS", "FinishReason", "SampleOutput", "Sampler",
           "SamplingParams", "SamplingTensors", "TokenLogprobs", "filter_probs", "finish_reason", "sample_batch",
           "sampling_tensors", "token_logprobs"]

# "error": the request failed alone (its grammar rejected a drawn token, its draw raised); Request.error says why.
FinishReason = Literal["stop", "length", "error"]
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on a logit_bias value
MAX_TOKEN_IDS_LOGPROB = 64  # ids a request may ask the log-probabilities of (token_ids_logprob)


class SamplingParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(0.0, ge=0.0, allow_inf_nan=False, description=f"below {SAMPLING_EPS:g} = greedy")
    top_k: int = Field(-1, ge=-1, lt=2**31, description="-1 or 0 = all tokens")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    min_p: float = Field(0.0, ge=0.0, lt=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**63)
    max_new_tokens: int = Field(16, ge=1)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_new_tokens: int = Field(0, ge=0)
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0.0, allow_inf_nan=False, description="1 = off")
    logit_bias: tuple[tuple[int, float], ...] = Field((), description="(token id, bias) pairs, ids distinct")
    token_ids_logprob: tuple[int, ...] = Field((), max_length=MAX_TOKEN_IDS_LOGPROB,
                                               description="report these ids' log-probabilities too, in this order")
    logprob_start_len: int | None = Field(None, ge=0, description="prompt log-probabilities from this position "
                                                                   "(None: none); must be < the prompt length")
    grammar: Grammar | None = Field(None, description="structured output: the tokens must match it")

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: tuple[tuple[int, float], ...]) -> tuple[tuple[int, float], ...]:
        ids = [i for i, _ in v]
        if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"logit_bias token ids must be distinct and ≥ 0, got {ids}")
        bad = [(i, b) for i, b in v if not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS]  # NaN fails too
        if bad:
            raise ValueError(f"logit_bias values must lie in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bad}")
        return v

    @field_validator("stop_token_ids", "token_ids_logprob")
    @classmethod
    def _non_negative(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(t < 0 for t in v):
            raise ValueError(f"token ids must be ≥ 0, got {list(v)}")
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
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    @property
    def uses_history(self) -> bool:
        """Whether the draw depends on the tokens seen so far (a frequency, presence or repetition penalty)."""
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def penalized(self) -> bool:
        """Whether the logits change before the draw (a penalty or a logit bias)."""
        return self.uses_history or bool(self.logit_bias)

    def penalize(self, logits: torch.Tensor, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> torch.Tensor:
        """One row's logits `[V]` with this request's penalties and bias, from its history (on the host)."""
        if not self.penalized:
            return logits
        return apply_penalties_row(logits, list(prompt_ids), list(output_ids), self.frequency_penalty,
                                   self.presence_penalty, self.repetition_penalty, dict(self.logit_bias))

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0 or bool(self.token_ids_logprob)

    def banned(self, n_generated: int, eos_id: int) -> list[int]:
        """Token ids that may not be drawn after n_generated tokens (min_new_tokens not reached yet)."""
        if n_generated >= self.min_new_tokens:
            return []
        return sorted({*self.stop_token_ids, *([] if self.ignore_eos else [eos_id])})


class Sampler:
    """Draws one request's tokens: the k-th token (k = 0, 1, …) comes from the random stream of (seed, k).

    The state is (seed, tokens drawn so far), shipped as 16 bytes. One definition of a draw: `sample` is a
    one-row `kernels.sampling.sample_batch`, so the batched path (counter = output length) gives the same
    tokens for the same seed and logits.
    """

    STATE_BYTES = 16  # seed, tokens drawn: little-endian uint64 each

    def __init__(self, params: SamplingParams, vocab_size: int):
        bad = [t for t in params.stop_token_ids if t >= vocab_size]
        if bad:
            raise ValueError(f"stop token ids {bad} are outside the vocabulary [0, {vocab_size})")
        bad = [i for i, _ in params.logit_bias if i >= vocab_size]
        if bad:
            raise ValueError(f"logit_bias token ids {bad} are outside the vocabulary [0, {vocab_size})")
        bad = [t for t in params.token_ids_logprob if t >= vocab_size]
        if bad:
            raise ValueError(f"token_ids_logprob ids {bad} are outside the vocabulary [0, {vocab_size})")
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.num_drawn = 0
        # Where the engine keeps this request's token history on the device (engine/penalties.py binds it).
        self.history: tuple[object, int] | None = None  # (SlotHistory, slot)
        # The prompt's distinct ids for the repetition penalty when the request's prompt_ids are placeholders
        # (a state shipped to a decode worker carries them; engine/state_io.py).
        self.prompt_id_set: tuple[int, ...] | None = None

    def sample(self, logits: torch.Tensor, banned: list[int] | tuple[int, ...] = (),
               token_bitmask: torch.Tensor | None = None) -> int:
        """One token from logits `[vocab]`, never one of `banned` (on the CPU), within `token_bitmask`
        `[⌈V/32⌉]` int32 when given (its grammar's mask). Penalties and bias are the caller's: pass
        `params.penalize(logits, …)`."""
        row = logits.detach().float().cpu().reshape(1, -1)  # [1, V]
        params = _sampling_tensors([(self.params, self.seed, self.num_drawn, list(banned))], row.device)
        params.want_top_logprobs, params.token_ids = 0, None
        if token_bitmask is not None:
            params.token_bitmask = token_bitmask.cpu().reshape(1, -1)
        token = int(sample_batch(row, params).tokens[0])
        self.num_drawn += 1
        return token

    def advance(self, num_tokens: int = 1) -> None:
        """Count tokens drawn for this request by the batched path, so that the shipped state is current."""
        self.num_drawn += num_tokens

    def get_state(self) -> bytes:
        return struct.pack("<QQ", self.seed, self.num_drawn)

    def set_state(self, state: bytes) -> None:
        if not isinstance(state, bytes | bytearray) or len(state) != self.STATE_BYTES:
            got = f"{len(state)} bytes" if isinstance(state, bytes | bytearray) else type(state).__name__
            raise ValueError(f"sampler state: expected {self.STATE_BYTES} bytes (seed, tokens drawn), got {got}")
        seed, num_drawn = struct.unpack("<QQ", state)
        if seed >= 2**63 or num_drawn >= 2**63:
            raise ValueError(f"sampler state: seed {seed} and tokens drawn {num_drawn} must be < 2**63")
        self.seed, self.num_drawn = seed, num_drawn


def sampling_tensors(rows: Sequence[tuple[SamplingParams, Sampler, int, int]],
                     device: torch.device | str) -> SamplingTensors:
    """`sample_batch`'s inputs for rows of (params, sampler, n_generated, eos_id).

    counter = n_generated; banned = params.banned(n_generated, eos_id); N = the most top_logprobs any row
    wants; token_ids = each row's token_ids_logprob (−1 padded; None when no row has any); the host-side
    promises (all greedy, top-k/top-p used) from the params. Built on the host as one float and one int
    tensor, each copied once (pinned, non-blocking on CUDA).
    """
    return _sampling_tensors([(p, s.seed, n, p.banned(n, eos)) for p, s, n, eos in rows], torch.device(device))


def _sampling_tensors(rows: list[tuple[SamplingParams, int, int, list[int]]], device: torch.device) -> SamplingTensors:
    """From rows of (params, seed, counter, banned ids)."""
    B, width = len(rows), max([1, *(len(banned) for *_, banned in rows)])
    k = max([0, *(len(p.token_ids_logprob) for p, *_ in rows)])
    floats = torch.tensor([[p.temperature, p.top_p, p.min_p] for p, *_ in rows], dtype=torch.float32)
    ints = torch.tensor([[p.top_k, seed, counter, *banned, *[-1] * (width - len(banned)),
                          *p.token_ids_logprob, *[-1] * (k - len(p.token_ids_logprob))]
                         for p, seed, counter, banned in rows], dtype=torch.int64)
    floats, ints = floats.reshape(B, 3), ints.reshape(B, 3 + width + k)  # [B, 3], [B, 3 + M + K]
    if device.type == "cuda":
        floats = floats.pin_memory().to(device, non_blocking=True)
        ints = ints.pin_memory().to(device, non_blocking=True)
    return SamplingTensors(temperature=floats[:, 0], top_k=ints[:, 0].to(torch.int32), top_p=floats[:, 1],
                           min_p=floats[:, 2], seed=ints[:, 1], counter=ints[:, 2], ban_ids=ints[:, 3:3 + width],
                           token_ids=ints[:, 3 + width:] if k else None,
                           want_top_logprobs=max([0, *(p.top_logprobs for p, *_ in rows)]),
                           all_greedy=all(p.greedy for p, *_ in rows),
                           uses_top_k_or_p=any(not p.greedy and (p.top_k > 1 or p.top_p < 1.0) for p, *_ in rows))


@dataclass(frozen=True)
class TokenLogprobs:
    """A token's log-probability at its position, the position's most likely tokens with theirs, and those of
    the request's token_ids_logprob (in its order)."""

    logprob: float
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()
    ids_logprobs: tuple[float, ...] = ()


def token_logprobs(logits: torch.Tensor, token: int, top_n: int, token_ids: Sequence[int] = ()) -> TokenLogprobs:
    """Log-softmax of one position's raw logits `[vocab]`: `token`'s value, the top_n best (ties: lower id) and
    the values at token_ids."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    value = float(logp[token])
    ids = tuple(float(logp[i]) for i in token_ids)
    if top_n <= 0:
        return TokenLogprobs(value, ids_logprobs=ids)
    top = torch.topk(logp, min(top_n, logp.shape[-1]))
    return TokenLogprobs(value, tuple(top.indices.tolist()), tuple(float(v) for v in top.values.tolist()), ids)


def finish_reason(token: int, n_generated: int, params: SamplingParams, eos_id: int) -> FinishReason | None:
    """Why generation stops after `token` (the n_generated-th new token), or None to continue."""
    if token in params.stop_token_ids or (token == eos_id and not params.ignore_eos):
        return "stop"
    if n_generated >= params.max_new_tokens:
        return "length"
    return None
