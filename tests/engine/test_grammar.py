"""Structured output in the engine (engine/grammar.py, sparsepd/grammar.py): grammars compile once per text
and a bad one raises with the compiler's message; the tokenizer.json vocabulary and the byte vocabulary
allow the same tokens (never a special token or an id past the tokenizer); every engine output is accepted
prefix by prefix by a fresh matcher, a finished JSON output validates against its schema, and the tokens
equal the reference loop's with the same grammar; the rules with min_new_tokens and ignore_eos; a token
the matcher rejects fails that request alone; the decode side replays the shipped tokens."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from sparsepd.engine.engine import Engine
from sparsepd.engine.generate import generate
from sparsepd.engine.grammar import allowed_ids, token_bitmask
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.engine.state_io import export_state, import_state
from sparsepd.grammar import Grammar, Grammars, Vocabulary
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset
from sparsepd.router.model_card import MODELS_DIR

xgr = pytest.importorskip("xgrammar")
EOS = 257
BYTES = Vocabulary(vocab_size=260, eos_id=EOS)
# Small schemas a random-weight model completes in a few tokens: enums, booleans, bounded integers, bounded
# strings (a pattern: xgrammar 0.2.9 lets raw control characters into maxLength strings, which strict JSON
# parsers refuse).
SCHEMAS = [{"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"]},
           {"type": "object", "properties": {"c": {"enum": ["red", "blue"]},
                                             "n": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["c", "n"]},
           {"type": "object", "properties": {"s": {"type": "string", "pattern": "^[a-z]{1,3}$"}}, "required": ["s"]}]
GRAMMARS = [*(Grammar(kind="json_schema", text=json.dumps(s)) for s in SCHEMAS),
            Grammar(kind="regex", text="[a-z]{2,4}-(x|y)"),
            Grammar(kind="ebnf", text='root ::= "yes" | "no" | "maybe " [0-9]')]
PROMPTS = [[256, *b"a"], [256, *b"bb"], [256, *b"ccc"], [256, *b"dddd"], [256, *b"eeeee"]]


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny"), seed=0)


def _engine(model, overlap: bool = False) -> Engine:
    return Engine(model, PoolConfig(num_slots=8, max_batch_tokens=64, num_pages=64), overlap=overlap)


def _check_matches(grammar: Grammar, tokens: list[int], finish: str) -> None:
    """A fresh matcher (its own compiler) accepts every prefix; a "stop" output is complete."""
    matcher = xgr.GrammarMatcher(Grammars(BYTES).compile(grammar))
    for i, token in enumerate(tokens):
        assert matcher.accept_token(token), f"{grammar.kind}: token {i} ({token}) of {tokens} is rejected"
    if finish == "stop":
        assert matcher.is_terminated() and tokens[-1] == EOS, tokens
        if grammar.kind == "json_schema":
            jsonschema.validate(json.loads(bytes(tokens[:-1])), json.loads(grammar.text))


# --- compilation ---------------------------------------------------------------------------------------
def test_grammars_compile_once_per_text_and_evict_the_oldest():
    grammars = Grammars(BYTES, cache_size=2)
    a, b, c = GRAMMARS[3], GRAMMARS[4], Grammar(kind="regex", text="z+")
    assert grammars.compile(a) is grammars.compile(Grammar(kind="regex", text=a.text))
    assert grammars.compiled == 1
    grammars.compile(b)
    grammars.compile(a)  # a is now the most recent
    grammars.compile(c)  # evicts b
    assert grammars.compiled == 3
    grammars.compile(a)
    assert grammars.compiled == 3
    grammars.compile(b)
    assert grammars.compiled == 4


BAD = [("json_schema", '{"type": "objectx"}', 'Unsupported type "objectx"'),
       ("json_schema", "{not json", "Failed to parse JSON"),
       ("regex", "[a-z", "Regex parsing error"),
       ("ebnf", "root ::= foo", 'Rule "foo" is not defined'),
       ("structural_tag", '{"type": "structural_tag"}', "must have a format field"),
       ("structural_tag", '{"structures": [{"begin": "<a>"}], "triggers": ["<a"]}', "begin, schema, end")]


@pytest.mark.parametrize("kind,text,needle", BAD, ids=[f"{k}:{t[:12]}" for k, t, _ in BAD])
def test_a_bad_grammar_raises_with_the_compilers_message(kind, text, needle):
    with pytest.raises(ValueError, match=f"^{kind} does not compile: ") as err:
        Grammars(BYTES).compile(Grammar(kind=kind, text=text))
    assert needle in str(err.value), str(err.value)


def test_tokenizer_vocabulary_allows_what_the_byte_vocabulary_does():
    """The tiny preset's tokenizer.json (the router's) and the byte vocabulary (the workers'): the same masks
    (bytes that can start a UTF-8 character, then its continuation bytes, and EOS); specials (BOS 256, pad
    258, 259) and ids past the tokenizer (a model vocabulary of 264) are never allowed."""
    text = (MODELS_DIR / "tiny" / "tokenizer.json").read_text()
    utf8_starts = [*range(128), *range(0xC2, 0xF5)]
    for vocab_size in (260, 264):
        masks = []
        for vocabulary in (Vocabulary(vocab_size=vocab_size, eos_id=EOS, tokenizer_json=text),
                           Vocabulary(vocab_size=vocab_size, eos_id=EOS)):
            matcher = xgr.GrammarMatcher(Grammars(vocabulary).compile(Grammar(kind="regex", text="[\\s\\S]{0,2}")))
            steps = [allowed_ids(token_bitmask([_Match(matcher)], vocab_size, "cpu")[0], vocab_size)]
            assert matcher.accept_token(ord("a")) and matcher.accept_token(0xC3)  # the lead byte of "é"
            steps.append(allowed_ids(token_bitmask([_Match(matcher)], vocab_size, "cpu")[0], vocab_size))
            assert steps == [[*utf8_starts, EOS], list(range(0x80, 0xC0))], (vocab_size, vocabulary.tokenizer_json)
            masks.append(steps)
        assert masks[0] == masks[1], vocab_size


class _Match:
    """A GrammarMatch over a given matcher (the test builds matchers itself)."""

    def __init__(self, matcher):
        self.matcher = matcher

    terminated = False

    def fill(self, bitmask, row):
        self.matcher.fill_next_token_bitmask(bitmask, row)


# --- the engine -----------------------------------------------------------------------------------------
def _params() -> list[SamplingParams]:
    params = [SamplingParams(max_new_tokens=40, grammar=g) for g in GRAMMARS]
    params[2] = params[2].model_copy(update={"temperature": 0.8, "seed": 5})  # one sampled row
    return params


@pytest.fixture(scope="module")
def served(model):
    """The grammar batch through the engine (greedy rows and one seeded sampled row)."""
    engine = _engine(model)
    requests = engine.generate(PROMPTS, _params())
    assert engine.is_idle_and_empty()
    return requests


def test_engine_outputs_match_their_grammars(served):
    for request, grammar in zip(served, GRAMMARS, strict=True):
        assert request.finish_reason == "stop", (grammar, request.output_ids)
        _check_matches(grammar, request.output_ids, request.finish_reason)


def test_engine_tokens_equal_the_reference_loop_with_the_same_grammar(served, model):
    """Greedy JSON, sampled JSON, EBNF (the reference loop costs a forward a token: three of the five)."""
    for i in (0, 2, 4):
        request, prompt, params = served[i], PROMPTS[i], _params()[i]
        reference = generate(model, prompt, params)
        assert request.output_ids == reference.output_ids, params.grammar
        assert reference.finish_reason == request.finish_reason


def test_min_new_tokens_and_ignore_eos_with_a_grammar(model):
    """min_new_tokens keeps EOS off while the grammar allows something else ([a-z]{1,6}: at least 4 letters);
    when the grammar must end, it wins over the ban ("ok" then EOS after 3 tokens, min 5); ignore_eos does not
    carry a request past its grammar's end."""
    ok = Grammar(kind="ebnf", text='root ::= "ok"')
    params = [SamplingParams(max_new_tokens=12, min_new_tokens=4, grammar=Grammar(kind="regex", text="[a-z]{1,6}")),
              SamplingParams(max_new_tokens=12, min_new_tokens=5, grammar=ok),
              SamplingParams(max_new_tokens=12, ignore_eos=True, grammar=ok)]
    prompts = PROMPTS[:3]
    engine = _engine(model)
    requests = engine.generate(prompts, params)
    assert engine.is_idle_and_empty()
    letters = requests[0].output_ids
    assert requests[0].finish_reason == "stop" and 4 <= len(letters) - 1 <= 6 and letters[-1] == EOS, letters
    assert [r.output_ids for r in requests[1:]] == [[*b"ok", EOS]] * 2
    assert [r.finish_reason for r in requests] == ["stop"] * 3
    for request, prompt, p in zip(requests, prompts, params, strict=True):
        assert generate(model, prompt, p).output_ids == request.output_ids


def test_a_rejected_token_fails_that_request_alone(model):
    engine = _engine(model, overlap=True)
    params = SamplingParams(max_new_tokens=8, grammar=GRAMMARS[4])
    bad, good = engine.submit(PROMPTS[0], params), engine.submit(PROMPTS[1], params)
    bad.grammar.accept = lambda token: False  # as if a masked token had been drawn
    engine.scheduler.run_to_completion()
    assert engine.is_idle_and_empty()
    assert bad.finish_reason == "error" and "grammar does not allow it" in bad.error and bad.output_ids == []
    assert good.finish_reason == "stop"
    _check_matches(GRAMMARS[4], good.output_ids, "stop")


def test_decode_side_replays_the_shipped_tokens(model):
    """Prefill in one engine, the state (with the first token) into another, decode there: the reference's
    tokens; a shipped token the grammar does not allow is refused at import."""
    params = SamplingParams(max_new_tokens=30, grammar=GRAMMARS[3])
    prefill, decode = _engine(model), _engine(model, overlap=True)
    first = prefill.submit(PROMPTS[1], params)
    while not first.output_ids:
        prefill.step()
    descriptor, tensors = export_state(prefill.pools, first)
    prefill.abort(first.request_id)
    request = decode.make_request([0] * len(PROMPTS[1]), params, "moved")
    decode.scheduler.reserve(request)
    import_state(decode.pools, request, descriptor, tensors)
    decode.scheduler.activate(request)
    decode.scheduler.run_to_completion()
    assert decode.is_idle_and_empty() and prefill.is_idle_and_empty()
    assert request.output_ids == generate(model, PROMPTS[1], params).output_ids
    _check_matches(GRAMMARS[3], request.output_ids, request.finish_reason)

    other = decode.make_request([0] * len(PROMPTS[1]), params, "refused")
    decode.scheduler.reserve(other)
    with pytest.raises(ValueError, match="does not match the request's grammar"):
        import_state(decode.pools, other, descriptor.model_copy(update={"output_ids": (ord("-"),)}), tensors)
    decode.scheduler.release(other)
    assert decode.is_idle_and_empty()


def test_bitmask_rows_without_a_grammar_allow_everything():
    grammars = Grammars(BYTES)
    from sparsepd.engine.grammar import GrammarMatch

    match = GrammarMatch(grammars.compile(Grammar(kind="regex", text="q")))
    mask = token_bitmask([None, match, None], 260, "cpu")
    assert mask.dtype == torch.int32 and tuple(mask.shape) == (3, 9)
    assert allowed_ids(mask[0], 260) == list(range(260)) == allowed_ids(mask[2], 260)
    assert allowed_ids(mask[1], 260) == [ord("q")]
    assert token_bitmask([None, None], 260, "cpu") is None
