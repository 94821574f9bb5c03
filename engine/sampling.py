"""Per-request sampling: greedy, temperature, top-k, top-p, min-p, a seed, min_new_tokens, stop conditions,
log-probabilities (of the output, of chosen token ids, and of the prompt: engine/prompt_logprobs.py),
frequency/presence/repetition penalties, a logit bias and a grammar (structured output: engine/grammar.py).

`SamplingParams` is the floor's (sparsepd/sampling_params.py: defined and validated once, at the edge; re-exported
here for the engine's callers). Penalties and bias change the logits before the draw (kernels/sampling.py's
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

from sparsepd.kernels.sampling import (
    SampleOutput,
    SamplingTensors,
    apply_penalties_row,
    filter_probs,
    sample_batch,
)
from sparsepd.sampling_params import MAX_TOKEN_IDS_LOGPROB, MAX_TOP_LOGPROBS, SAMPLING_EPS, SamplingParams

__all__ = ["MAX_TOKEN_IDS_LOGPROB", "MAX_TOP_LOGPROBS", "SAMPLING_EPS", "FinishReason", "SampleOutput", "Sampler",
           "SamplingParams", "SamplingTensors", "TokenLogprobs", "filter_probs", "finish_reason", "penalize",
           "sample_batch", "sampling_tensors", "token_logprobs"]

# "error": the request failed alone (its grammar rejected a drawn token, its draw raised); Request.error says why.
FinishReason = Literal["stop", "length", "error"]


def penalize(params: SamplingParams, logits: torch.Tensor, prompt_ids: Sequence[int],
             output_ids: Sequence[int]) -> torch.Tensor:
    """One row's logits `[V]` with the request's penalties and bias, from its history (on the host)."""
    if not params.penalized:
        return logits
    return apply_penalties_row(logits, list(prompt_ids), list(output_ids), params.frequency_penalty,
                               params.presence_penalty, params.repetition_penalty, dict(params.logit_bias))


class Sampler:
    """Draws one request's tokens: the k-th token (k = 0, 1, …) comes from the random stream of (seed, k).

    The state is (seed, tokens drawn so far), shipped as 16 bytes. One definition of a draw: `sample` is a
    one-row `kernels.sampling.sample_batch`, so the batched path (counter = output length) gives the same
    tokens for the same seed and logits.
    """

    STATE_BYTES = 16  # seed, tokens drawn: little-endian uint64 each

    def __init__(self, params: SamplingParams, vocab_size: int):
        params.check_vocabulary(vocab_size)
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
        `penalize(params, logits, …)`."""
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
