"""Conversions between worker-control messages and plain values (no engine types: proto depends on nothing)."""

from __future__ import annotations

from typing import Any

from sparsepd.proto import worker_pb2


def sampling_to_dict(msg: worker_pb2.SamplingParams) -> dict[str, Any]:
    """Keyword arguments for the engine's SamplingParams.checked (which validates them). A proto3 zero
    means "not set": top_p 0 is 1.0 (off), top_k 0 is off, repetition_penalty 0 is 1.0 (off); an empty
    grammar_kind is no grammar."""
    grammar = dict(kind=msg.grammar_kind, text=msg.grammar) if msg.grammar_kind or msg.grammar else None
    return dict(temperature=msg.temperature, top_k=msg.top_k, top_p=msg.top_p or 1.0, min_p=msg.min_p,
                seed=msg.seed if msg.HasField("seed") else None, max_new_tokens=msg.max_new_tokens,
                stop_token_ids=tuple(msg.stop_token_ids), ignore_eos=msg.ignore_eos, min_new_tokens=msg.min_new_tokens,
                logprobs=msg.logprobs, top_logprobs=msg.top_logprobs, frequency_penalty=msg.frequency_penalty,
                presence_penalty=msg.presence_penalty, repetition_penalty=msg.repetition_penalty or 1.0,
                logit_bias=tuple(sorted(msg.logit_bias.items())), token_ids_logprob=tuple(msg.token_ids_logprob),
                logprob_start_len=msg.logprob_start_len if msg.HasField("logprob_start_len") else None,
                grammar=grammar)


def sampling_from_dict(values: dict[str, Any]) -> worker_pb2.SamplingParams:
    msg = worker_pb2.SamplingParams(
        temperature=values.get("temperature", 0.0), top_k=values.get("top_k", -1), top_p=values.get("top_p", 1.0),
        min_p=values.get("min_p", 0.0), max_new_tokens=values.get("max_new_tokens", 16),
        stop_token_ids=list(values.get("stop_token_ids", ())), ignore_eos=values.get("ignore_eos", False),
        min_new_tokens=values.get("min_new_tokens", 0), logprobs=values.get("logprobs", False),
        top_logprobs=values.get("top_logprobs", 0), frequency_penalty=values.get("frequency_penalty", 0.0),
        presence_penalty=values.get("presence_penalty", 0.0), repetition_penalty=values.get("repetition_penalty", 1.0),
        logit_bias=dict(values.get("logit_bias", ())), token_ids_logprob=list(values.get("token_ids_logprob", ())))
    if values.get("seed") is not None:
        msg.seed = values["seed"]
    if values.get("logprob_start_len") is not None:
        msg.logprob_start_len = values["logprob_start_len"]
    if values.get("grammar") is not None:
        msg.grammar_kind, msg.grammar = values["grammar"]["kind"], values["grammar"]["text"]
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
