"""Single-process generation with the reference model: prefill the prompt, then decode token by token.

The simplest correct path, used by `sparsepd generate` and as the baseline that every faster path must
reproduce token for token.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparsepd.engine.sampling import FinishReason, Sampler, SamplingParams, finish_reason
from sparsepd.model.transformer import Transformer


@dataclass
class Generation:
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: FinishReason
    prefill_s: float
    decode_s: float
    state_bytes: int

    @property
    def decode_tokens_per_s(self) -> float:
        steps = len(self.output_ids) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


def generate(model: Transformer, prompt_ids: list[int], params: SamplingParams,
             on_token: Callable[[int], None] | None = None, prefill_chunk: int | None = None) -> Generation:
    """Generate up to params.max_new_tokens tokens after prompt_ids (chunked prefill if prefill_chunk)."""
    cfg = model.cfg
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if len(prompt_ids) + params.max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens + max_new_tokens={params.max_new_tokens} exceeds "
                         f"the model's max_seq_len={cfg.max_seq_len}")
    sampler = Sampler(params, cfg.vocab_size)
    ids = torch.tensor(prompt_ids, dtype=torch.long, device=model.device)
    state = model.new_state()
    t0 = time.perf_counter()
    chunk = prefill_chunk or len(prompt_ids)
    for begin in range(0, len(prompt_ids), chunk):
        logits = model.forward(ids[begin: begin + chunk], state)
    token = sampler.sample(logits[-1])
    t1 = time.perf_counter()
    out = [token]
    if on_token:
        on_token(token)
    reason = finish_reason(token, 1, params, cfg.eos_id)
    while reason is None:
        token = sampler.sample(model.decode(token, state))
        out.append(token)
        if on_token:
            on_token(token)
        reason = finish_reason(token, len(out), params, cfg.eos_id)
    return Generation(prompt_ids, out, reason, t1 - t0, time.perf_counter() - t1, state.num_bytes())
