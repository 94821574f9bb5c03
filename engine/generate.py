"""Single-process generation of one prompt: with the plain reference model (prefill, then decode token by
token: the baseline every faster path must reproduce token for token), or through the paged engine. A
grammar constrains the reference loop as it does the engine (engine/grammar.py: each step's mask from the
matcher, the same ban rule, the request ends with "stop" once the matcher has accepted its stop token)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sparsepd.engine.grammar import GrammarMatch, token_bitmask
from sparsepd.engine.prompt_logprobs import prompt_logprobs_ref
from sparsepd.engine.request import PromptLogprobs
from sparsepd.engine.sampling import (
    FinishReason,
    Sampler,
    SamplingParams,
    TokenLogprobs,
    finish_reason,
    penalize,
    token_logprobs,
)
from sparsepd.gpu_wait import GpuWait
from sparsepd.grammar import Grammars, Vocabulary
from sparsepd.model.transformer import Transformer


@dataclass
class Generation:
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: FinishReason
    prefill_s: float
    decode_s: float
    state_bytes: int
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # per output token, when params ask for them
    prompt_logprobs: PromptLogprobs | None = None  # when params.logprob_start_len is set

    @property
    def decode_tokens_per_s(self) -> float:
        steps = len(self.output_ids) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


def generate(model: Transformer, prompt_ids: list[int], params: SamplingParams,
             on_token: Callable[[int], None] | None = None, prefill_chunk: int | None = None,
             grammars: Grammars | None = None) -> Generation:
    """Generate up to params.max_new_tokens tokens after prompt_ids (chunked prefill if prefill_chunk); a
    grammar compiles with `grammars` (default: the byte vocabulary of the model's config)."""
    cfg = model.cfg
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if len(prompt_ids) + params.max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens + max_new_tokens={params.max_new_tokens} exceeds "
                         f"the model's max_seq_len={cfg.max_seq_len}")
    sampler = Sampler(params, cfg.vocab_size)
    match = None
    if params.grammar is not None:
        grammars = grammars or Grammars(Vocabulary(vocab_size=cfg.vocab_size, eos_id=cfg.eos_id))
        match = GrammarMatch(grammars.compile(params.grammar))
    ids = torch.tensor(prompt_ids, dtype=torch.long, device=model.device)
    state = model.new_state()
    t0 = time.perf_counter()
    chunk = prefill_chunk or len(prompt_ids)
    prompt_logits = []  # every prompt position's logits, when the prompt's log-probabilities are asked for
    for begin in range(0, len(prompt_ids), chunk):
        logits = model.forward(ids[begin: begin + chunk], state)
        if params.logprob_start_len is not None:
            prompt_logits.append(logits)
    prompt = None
    if params.logprob_start_len is not None:
        prompt = prompt_logprobs_ref(torch.cat(prompt_logits), prompt_ids, params.logprob_start_len,
                                     params.top_logprobs, params.token_ids_logprob)
    out: list[int] = []
    logprobs: list[TokenLogprobs] = []

    def pick(row: torch.Tensor) -> int:  # penalties and bias from the history on the host; logprobs from row
        mask = token_bitmask([match], cfg.vocab_size, "cpu") if match is not None else None
        token = sampler.sample(penalize(params, row, prompt_ids, out), params.banned(len(out), cfg.eos_id), mask)
        if params.wants_logprobs:
            logprobs.append(token_logprobs(row, token, params.top_logprobs, params.token_ids_logprob))
        if match is not None and not match.accept(token):
            raise RuntimeError(f"token {token} was drawn within the grammar's mask but the matcher rejects it")
        return token

    def reason_after(token: int) -> FinishReason | None:
        if match is not None and match.terminated:
            return "stop"
        return finish_reason(token, len(out), params, cfg.eos_id)

    token = pick(logits[-1])
    t1 = time.perf_counter()
    out.append(token)
    if on_token:
        on_token(token)
    reason = reason_after(token)
    while reason is None:
        token = pick(model.decode(token, state))
        out.append(token)
        if on_token:
            on_token(token)
        reason = reason_after(token)
    return Generation(prompt_ids, out, reason, t1 - t0, time.perf_counter() - t1, state.num_bytes(), logprobs,
                      prompt)


def generate_with_engine(model: Transformer, prompt_ids: list[int], params: SamplingParams,
                         max_batch_tokens: int | None = None, gpu_wait: GpuWait = "spin") -> Generation:
    """The same through the engine (pools, scheduler, chunked prefill of max_batch_tokens per step); gpu_wait: how
    the host waits for each step's tokens on a CUDA device (engine/draw.py `host_event`)."""
    from sparsepd.engine.engine import Engine
    from sparsepd.engine.pools import PoolConfig
    from sparsepd.engine.state_io import shipped_bytes

    budget = max_batch_tokens or len(prompt_ids)
    pages = -(-(len(prompt_ids) + params.max_new_tokens) // model.cfg.page_size)
    engine = Engine(model, PoolConfig(num_slots=1, max_batch_tokens=budget, num_pages=pages), gpu_wait=gpu_wait)
    request = engine.submit(prompt_ids, params)
    t0 = time.perf_counter()
    while not request.output_ids:
        engine.step()
    t1 = time.perf_counter()
    while request.finish_reason is None:
        engine.step()
    position = len(prompt_ids) + len(request.output_ids) - 1
    prompt = None
    if params.logprob_start_len is not None:
        prompt = PromptLogprobs(params.logprob_start_len, tuple(request.prompt_logprobs))
    return Generation(prompt_ids, request.output_ids, request.finish_reason, t1 - t0, time.perf_counter() - t1,
                      shipped_bytes(model.cfg, position), request.output_logprobs, prompt)
