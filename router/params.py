"""A public `GenerateRequest` checked and turned into what the router runs: the input ids, the sampling
parameters for the workers, and the stop conditions the router watches itself. The prompt is
`tokenized.input_ids` as sent, or, without them, `tokenized.original_text` encoded by the tokenizer's own
special-token rule (sparsepd/prompt_encoding.py), the rule of every path that turns text into ids.

Semantics follow SGLang's own gRPC server (proto3 zeros are not the semantic defaults: temperature 0
is greedy; top_p must be in (0, 1]; top_k 0 or -1 is off; an absent max_new_tokens is "up to the context
length"; n 0 is 1, and n > 1 gives n sequences from one prefill, `RequestSpec.choices`). A bad request
raises `InvalidRequest` naming the field, the value and what is allowed; features the workers do not have
(multimodal input, input embeddings, LoRA, hidden states) are refused the same way, never ignored.
Penalties as SGLang and OpenAI take them: frequency_penalty and presence_penalty in [-2, 2],
repetition_penalty > 0 (0 = unset = 1, off), logit_bias a map from token id (a decimal string) to a bias in
[-100, 100]. Each bound is the floor's (sparsepd/sampling_params.py `BOUNDS`, the one definition the workers
validate by too); the checked values become the floor's `SamplingParams`, sent to the workers as its worker-control
message (proto/convert.py).

Log-probabilities (`return_logprob`) are the log-softmax of the model's raw logits. Each output token gets its
own, the `top_logprobs_num` (≤ 20) most likely tokens' and those of the ids in `token_ids_logprob` (at most 64
ids < vocab_size, reported in the order given). `logprob_start_len` = s asks for the prompt's too, as SGLang
computes them: -1 is output only; 0 ≤ s < the input length L reports input tokens s … L−1, token s with no
value (the absent `InputTokenLogProb.value`) and token p > s with log_softmax(logits at p−1)[token p], with its
top ones and token ids' values; s ≥ L, or < -1, is INVALID_ARGUMENT. Without return_logprob, logprob_start_len
is ignored (as SGLang does) and a top_logprobs_num or token_ids_logprob is refused.

0 and unset: proto3 cannot tell them apart, and, like SGLang's own server, 0 means "from the first input
token". The SGLang gateway always sets the field: -1 for /v1/completions and /v1/chat/completions (with or
without `echo`: smg 1.13 sends -1 for `echo=true, logprobs=N`, and its /v1/completions answer carries no
log-probabilities at all), and for /generate the request's own value, -1 when absent. So every gateway request
is served as asked; a raw gRPC client that leaves the field unset with return_logprob gets the prompt's too.
Structured output: the `constraint` oneof (regex, json_schema, ebnf_grammar, structural_tag) becomes the
workers' grammar (sparsepd/grammar.py); `check_grammar` compiles it against the model's vocabulary so that a
bad one is refused here, with the compiler's message, before any worker does work.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace

from sparsepd.grammar import MAX_GRAMMAR_CHARS, Grammar, Grammars
from sparsepd.prompt_encoding import PromptEncoder
from sparsepd.proto import sglang_scheduler_pb2 as pb
from sparsepd.proto import worker_pb2
from sparsepd.proto.convert import sampling_to_proto
from sparsepd.router.model_card import ModelCard
from sparsepd.sampling_params import BOUNDS, MAX_TOKEN_IDS_LOGPROB, MAX_TOP_LOGPROBS, SamplingParams, unset_zero

MAX_CHOICES = 64  # n: sequences of one request (each holds its own decode slot and pages)
MAX_STOP_STRINGS, MAX_STOP_CHARS = 64, 4096
GRAMMAR_FIELDS = {"regex": "regex", "json_schema": "json_schema", "ebnf_grammar": "ebnf",
                  "structural_tag": "structural_tag"}  # the public oneof's field → the grammar's kind


class InvalidRequest(ValueError):
    """The request cannot be served as asked (→ INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class RequestSpec:
    request_id: str
    input_ids: list[int]
    sampling: worker_pb2.SamplingParams  # what the workers enforce
    max_new_tokens: int
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    eos_id: int | None = None  # None when ignore_eos
    no_stop_trim: bool = False
    stream: bool = False
    logprobs: bool = False  # report each output token's log-probability
    top_logprobs: int = 0  # and this many most likely tokens per position
    token_ids_logprob: tuple[int, ...] = ()  # and these ids' per position
    logprob_start_len: int | None = None  # and the prompt's from this position (None: output only)
    n: int = 1  # sequences to generate from this prompt (parallel sampling; `choices`)
    index: int = 0  # which of them this spec is (choices() numbers them)
    grammar: Grammar | None = None  # structured output (also in `sampling`)

    def choices(self) -> list[RequestSpec]:
        """The n sequences as specs of their own: choice 0 keeps the request id and seed; choice i > 0 has the
        id `<id>#<i>` and the seed `choice_seed(seed, i)` (unseeded stays unseeded: each draws its own)."""
        out = []
        for i in range(self.n):
            sampling = worker_pb2.SamplingParams()
            sampling.CopyFrom(self.sampling)
            if i and sampling.HasField("seed"):
                sampling.seed = choice_seed(sampling.seed, i)
            out.append(replace(self, request_id=self.request_id if i == 0 else f"{self.request_id}#{i}",
                               sampling=sampling, index=i))
        return out


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice `index` of a seeded n > 1 request: a fixed odd step per choice, modulo 2**63."""
    return (seed + index * 0x9E3779B97F4A7C15) % 2**63


def parse_generate(req: pb.GenerateRequest, card: ModelCard, encoder: PromptEncoder | None = None,
                   max_new_tokens_limit: int | None = None) -> RequestSpec:
    """encoder: the model's text-to-ids rule (None: the model has no tokenizer)."""
    _refuse_unsupported(req)
    ids = _input_ids(req, card, encoder)
    sp = req.sampling_params
    room = card.max_context_length - len(ids)
    limit = room if max_new_tokens_limit is None else min(room, max_new_tokens_limit)
    if sp.HasField("max_new_tokens"):
        max_new = sp.max_new_tokens
        if not 1 <= max_new <= limit:
            raise InvalidRequest(
                f"sampling_params.max_new_tokens={max_new} is out of range: allowed 1..{limit} (the input has "
                f"{len(ids)} tokens, the context length is {card.max_context_length}"
                + (f", the server's limit is {max_new_tokens_limit})" if max_new_tokens_limit else ")"))
    else:
        max_new = limit
    start = _logprob_start_len(req, len(ids))
    _check_token_ids_logprob(req, card)
    repetition = unset_zero("repetition_penalty", sp.repetition_penalty)  # top_p 0 is refused (SGLang's rule)
    for name, value in (("temperature", sp.temperature), ("top_p", sp.top_p), ("min_p", sp.min_p),
                        ("frequency_penalty", sp.frequency_penalty), ("presence_penalty", sp.presence_penalty),
                        ("repetition_penalty", repetition)):
        _check_range(name, value)
    logit_bias = _logit_bias(sp, card)
    _check_range("top_k", sp.top_k)
    if sp.HasField("seed"):
        _check_range("seed", sp.seed)
    bad_stop = [t for t in sp.stop_token_ids if t >= card.vocab_size]
    if bad_stop:
        raise InvalidRequest(f"sampling_params.stop_token_ids contains {bad_stop}: token ids must be < vocab_size "
                             f"{card.vocab_size}")
    if sp.min_new_tokens > max_new:
        raise InvalidRequest(f"sampling_params.min_new_tokens={sp.min_new_tokens} exceeds max_new_tokens={max_new}")
    if len(sp.stop) > MAX_STOP_STRINGS or any(len(x) > MAX_STOP_CHARS for x in sp.stop):
        raise InvalidRequest(f"sampling_params.stop has {len(sp.stop)} strings of up to "
                             f"{max(map(len, sp.stop))} characters: allowed at most {MAX_STOP_STRINGS} strings of "
                             f"at most {MAX_STOP_CHARS} characters")
    if sp.stop and encoder is None:
        raise InvalidRequest("sampling_params.stop needs a tokenizer and this model has none; use stop_token_ids")
    rid = req.request_id or f"req-{uuid.uuid4().hex}"
    stop_ids = frozenset(sp.stop_token_ids)
    eos = None if sp.ignore_eos else card.eos_id
    n = sp.n or 1
    if not 1 <= n <= MAX_CHOICES:
        raise InvalidRequest(f"sampling_params.n={n} is out of range: allowed 1..{MAX_CHOICES}")
    grammar = _grammar(sp)
    try:  # every value was checked above in the public field's words: this is the floor's model of them
        params = SamplingParams.checked(
            temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p, min_p=sp.min_p,
            seed=sp.seed if sp.HasField("seed") else None, max_new_tokens=max_new,
            stop_token_ids=tuple(sorted(stop_ids)), ignore_eos=sp.ignore_eos, min_new_tokens=sp.min_new_tokens,
            logprobs=req.return_logprob, top_logprobs=req.top_logprobs_num if req.return_logprob else 0,
            frequency_penalty=sp.frequency_penalty, presence_penalty=sp.presence_penalty,
            repetition_penalty=repetition, logit_bias=tuple(logit_bias.items()),
            token_ids_logprob=tuple(req.token_ids_logprob), logprob_start_len=start, grammar=grammar)
    except ValueError as exc:
        raise InvalidRequest(f"sampling_params: {exc}") from None
    return RequestSpec(rid, ids, sampling_to_proto(params), max_new, sp.min_new_tokens,
                       tuple(s for s in sp.stop if s), stop_ids, eos, sp.no_stop_trim, req.stream, req.return_logprob,
                       params.top_logprobs, tuple(req.token_ids_logprob), start, n, grammar=grammar)


def _logprob_start_len(req: pb.GenerateRequest, num_input: int) -> int | None:
    """The first input position to report log-probabilities for, or None (output only); module doc."""
    start = req.logprob_start_len
    if not req.return_logprob or start == -1:
        return None
    if not 0 <= start < num_input:
        raise InvalidRequest(f"logprob_start_len={start} is out of range: allowed -1 (output only) or "
                             f"0..{num_input - 1} (the input has {num_input} tokens)")
    return start


def _check_token_ids_logprob(req: pb.GenerateRequest, card: ModelCard) -> None:
    ids = list(req.token_ids_logprob)
    if len(ids) > MAX_TOKEN_IDS_LOGPROB:
        raise InvalidRequest(f"token_ids_logprob has {len(ids)} ids: allowed at most {MAX_TOKEN_IDS_LOGPROB}")
    bad = [t for t in ids if t >= card.vocab_size]
    if bad:
        raise InvalidRequest(f"token_ids_logprob contains {bad}: token ids must be < vocab_size {card.vocab_size}")


def check_grammar(spec: RequestSpec, grammars: Grammars) -> None:
    """Compile the request's grammar (cached); InvalidRequest with the compiler's message when it does not.
    May take a while on a new grammar: call it off the event loop."""
    if spec.grammar is None:
        return
    try:
        grammars.compile(spec.grammar)
    except ValueError as exc:
        field = next(f for f, kind in GRAMMAR_FIELDS.items() if kind == spec.grammar.kind)
        raise InvalidRequest(f"sampling_params.{field}: {exc}") from None


def _grammar(sp: pb.SamplingParams) -> Grammar | None:
    field = sp.WhichOneof("constraint")
    if field is None:
        return None
    text = getattr(sp, field)
    if not text.strip() or len(text) > MAX_GRAMMAR_CHARS:
        raise InvalidRequest(f"sampling_params.{field} has {len(text)} characters: expected a non-empty grammar "
                             f"of at most {MAX_GRAMMAR_CHARS}")
    return Grammar(kind=GRAMMAR_FIELDS[field], text=text)


def _input_ids(req: pb.GenerateRequest, card: ModelCard, encoder: PromptEncoder | None) -> list[int]:
    """The prompt: the ids sent (as they are, as SGLang takes them), else the text's by the tokenizer's rule."""
    ids, text = list(req.tokenized.input_ids), req.tokenized.original_text
    if not ids and text:
        if encoder is None:
            raise InvalidRequest("tokenized.input_ids is empty and this model has no tokenizer to encode "
                                 "tokenized.original_text; send token ids")
        ids = encoder.encode(text)
    if not ids:
        raise InvalidRequest("the input is empty: tokenized.input_ids (or tokenized.original_text) must hold at "
                             "least one token")
    if len(ids) >= card.max_context_length:
        raise InvalidRequest(f"the input has {len(ids)} tokens; the context length is {card.max_context_length}, "
                             f"so at most {card.max_context_length - 1} input tokens leave room for one new token")
    bad = next((i for i, t in enumerate(ids) if t >= card.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"tokenized.input_ids[{bad}]={ids[bad]} is not a token id: "
                             f"allowed 0..{card.vocab_size - 1}")
    return ids


def _logit_bias(sp: pb.SamplingParams, card: ModelCard) -> dict[int, float]:
    """OpenAI's logit_bias: token id (a decimal string) → bias in [-100, 100]."""
    out = {}
    for key, value in sorted(sp.logit_bias.items()):
        token = int(key) if key.strip().isdigit() else -1
        if not 0 <= token < card.vocab_size:
            raise InvalidRequest(f"sampling_params.logit_bias has key {key!r}: keys must be token ids "
                                 f"0..{card.vocab_size - 1}")
        if not BOUNDS["logit_bias"].admits(value):
            raise InvalidRequest(f"sampling_params.{BOUNDS['logit_bias'].error(f'logit_bias[{key!r}]', value)}")
        if token in out:
            raise InvalidRequest(f"sampling_params.logit_bias names token id {token} twice")
        out[token] = value
    return out


def _check_range(name: str, value: float) -> None:
    """The floor's bound of a sampling parameter (sparsepd/sampling_params.py), refused in the public field's name."""
    if not BOUNDS[name].admits(value):
        raise InvalidRequest(f"sampling_params.{BOUNDS[name].error(name, value)}")


def _refuse_unsupported(req: pb.GenerateRequest) -> None:
    checks = [
        (req.top_logprobs_num < 0 or req.top_logprobs_num > MAX_TOP_LOGPROBS,
         f"top_logprobs_num={req.top_logprobs_num} is out of range: allowed 0..{MAX_TOP_LOGPROBS}"),
        (req.top_logprobs_num > 0 and not req.return_logprob,
         f"top_logprobs_num={req.top_logprobs_num} needs return_logprob=true"),
        (len(req.token_ids_logprob) > 0 and not req.return_logprob,
         f"token_ids_logprob={list(req.token_ids_logprob)[:8]} needs return_logprob=true"),
        (req.return_hidden_states, "return_hidden_states is not supported"),
        (req.HasField("mm_inputs"), "mm_inputs: multimodal input is not supported (the model is text-only)"),
        (len(req.input_embeds) > 0, "input_embeds: input embeddings are not supported; send token ids"),
        (bool(req.custom_logit_processor), "custom_logit_processor is not supported"),
        (bool(req.lora_id), f"lora_id={req.lora_id!r}: LoRA adapters are not supported"),
    ]
    for bad, message in checks:
        if bad:
            raise InvalidRequest(message)
