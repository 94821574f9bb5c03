"""Conversions between worker-control messages and the values they carry: the floor's `SamplingParams`
(sparsepd/sampling_params.py, which validates them), log-probabilities and prefix-cache stats as plain values
(no engine types: proto depends on the floor only)."""

from __future__ import annotations

from sparsepd.proto import worker_pb2
from sparsepd.sampling_params import SamplingParams, unset_zero


def sampling_from_proto(msg: worker_pb2.SamplingParams) -> SamplingParams:
    """The message's parameters, validated (ValueError naming every bad field, its value and what is allowed).
    A proto3 zero where it means unset is the default (`unset_zero`: top_p and repetition_penalty 0 are 1.0,
    off); top_k 0 is off as it is; an empty grammar_kind is no grammar."""
    grammar = dict(kind=msg.grammar_kind, text=msg.grammar) if msg.grammar_kind or msg.grammar else None
    return SamplingParams.checked(
        temperature=msg.temperature, top_k=msg.top_k, top_p=unset_zero("top_p", msg.top_p), min_p=msg.min_p,
        seed=msg.seed if msg.HasField("seed") else None, max_new_tokens=msg.max_new_tokens,
        stop_token_ids=tuple(msg.stop_token_ids), ignore_eos=msg.ignore_eos, min_new_tokens=msg.min_new_tokens,
        logprobs=msg.logprobs, top_logprobs=msg.top_logprobs, frequency_penalty=msg.frequency_penalty,
        presence_penalty=msg.presence_penalty,
        repetition_penalty=unset_zero("repetition_penalty", msg.repetition_penalty),
        logit_bias=tuple(sorted(msg.logit_bias.items())), token_ids_logprob=tuple(msg.token_ids_logprob),
        logprob_start_len=msg.logprob_start_len if msg.HasField("logprob_start_len") else None, grammar=grammar)


def sampling_to_proto(params: SamplingParams) -> worker_pb2.SamplingParams:
    """The message that carries `params` (every field explicit: `sampling_from_proto` gives them back equal)."""
    msg = worker_pb2.SamplingParams(
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
        max_new_tokens=params.max_new_tokens, stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos, min_new_tokens=params.min_new_tokens, logprobs=params.logprobs,
        top_logprobs=params.top_logprobs, frequency_penalty=params.frequency_penalty,
        presence_penalty=params.presence_penalty, repetition_penalty=params.repetition_penalty,
        logit_bias=dict(params.logit_bias), token_ids_logprob=list(params.token_ids_logprob))
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprob_start_len is not None:
        msg.logprob_start_len = params.logprob_start_len
    if params.grammar is not None:
        msg.grammar_kind, msg.grammar = params.grammar.kind, params.grammar.text
    return msg


def top_logprobs(token_ids, logprobs) -> worker_pb2.TopLogprobs:
    return worker_pb2.TopLogprobs(token_ids=list(token_ids), logprobs=list(logprobs))


def id_logprobs(values) -> worker_pb2.TopLogprobs:
    """The values at the request's token_ids_logprob, in its order (the ids themselves are the request's)."""
    return worker_pb2.TopLogprobs(logprobs=list(values))


def prompt_logprobs(start: int, positions) -> worker_pb2.PromptLogprobs:
    """From values with .logprob, .top_ids, .top_logprobs, .ids_logprobs (prompt tokens start+1 …); the top and
    token-id lists when the positions hold them (a request that asked has them at every position)."""
    msg = worker_pb2.PromptLogprobs(start=start, logprobs=[x.logprob for x in positions])
    if positions and positions[0].top_ids:
        msg.top_logprobs.extend(top_logprobs(x.top_ids, x.top_logprobs) for x in positions)
    if positions and positions[0].ids_logprobs:
        msg.token_ids_logprobs.extend(id_logprobs(x.ids_logprobs) for x in positions)
    return msg


def speculative_stats(stats) -> worker_pb2.SpeculativeStats:
    """A worker's speculative decoding counters (engine/speculative.SpeculativeStats, or None: off) as its Stats
    report them."""
    if stats is None:
        return worker_pb2.SpeculativeStats()
    return worker_pb2.SpeculativeStats(num_steps=stats.num_steps, verifications=stats.verifications,
                                       drafted=stats.drafted, accepted=stats.accepted,
                                       accept_lengths=list(stats.accept_lengths))


def prefix_cache_stats(cache) -> worker_pb2.PrefixCacheStats:
    """A worker's prefix cache (engine/prefix_cache.PrefixCache, or None) as its Stats report it."""
    if cache is None:
        return worker_pb2.PrefixCacheStats(enabled=False)
    s = cache.stats
    return worker_pb2.PrefixCacheStats(enabled=True, hit_tokens=s.hit_tokens, miss_tokens=s.miss_tokens,
                                       evictions=s.evictions, entries=cache.num_snapshots,
                                       pages=len(cache.held_pages()), page_size=cache.page_size,
                                       hashes=cache.hashes(), page_evictions=s.page_evictions,
                                       num_bytes=cache.num_bytes(), hits=s.hits, host_hit_tokens=s.host_hit_tokens,
                                       host_evictions=s.host_evictions, host_entries=cache.num_host_snapshots,
                                       host_num_bytes=cache.host_used)
