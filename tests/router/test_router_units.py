"""The router's pieces without processes: the model card agrees with the model's presets and tokenizer,
the shipped tokenizer files are what the generator writes, incremental text and stop strings, and the
request conversion (SGLang's semantics of proto3 zeros)."""

from __future__ import annotations

import math
import random

import pytest

from sparsepd.model.tokenizer import ByteTokenizer
from sparsepd.model_config import PRESETS as MODEL_PRESETS
from sparsepd.proto import sglang_scheduler_pb2 as pb
from sparsepd.proto.convert import sampling_from_proto
from sparsepd.router.model_card import MODELS_DIR, PRESETS, card_for, write_byte_level_files
from sparsepd.router.params import InvalidRequest, parse_generate
from sparsepd.router.text import IncrementalText, StopStrings
from sparsepd.sampling_params import BOUNDS, SamplingParams


def test_preset_table_equals_the_models_presets():
    assert set(PRESETS) == set(MODEL_PRESETS)
    for name, info in PRESETS.items():
        cfg = MODEL_PRESETS[name]
        assert (info.vocab_size, info.max_seq_len, info.bos_id, info.eos_id, info.page_size) == (
            cfg.vocab_size, cfg.max_seq_len, cfg.bos_id, cfg.eos_id, cfg.page_size), name


def test_shipped_tiny_tokenizer_files_are_what_the_generator_writes(tmp_path):
    write_byte_level_files(tmp_path, "tiny")
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (tmp_path / name).read_bytes() == (MODELS_DIR / "tiny" / name).read_bytes(), f"{name} is stale"


def test_tiny_tokenizer_equals_the_models_byte_tokenizer():
    card = card_for("tiny")
    hf, ours = card.load_tokenizer(), ByteTokenizer(card.vocab_size, card.bos_id, card.eos_id)
    rule = card.prompt_encoder()
    rng = random.Random(0)
    texts = ["", "Hello, world", "héllo wörld", "日本語のテキスト", "emoji 🙂 tab\t newline\n", "\x00\x7f~"]
    texts += ["".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(1, 40))) for _ in range(20)]
    for text in texts:
        assert rule.encode(text) == hf.encode(text).ids == ours.encode(text) == list(text.encode()), text
    for _ in range(50):
        ids = [rng.randrange(card.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids), ids


def test_zip_is_deterministic():
    assert card_for("tiny").tokenizer_zip() == card_for("tiny").tokenizer_zip()


def test_incremental_text_holds_back_split_characters():
    tok = card_for("tiny").load_tokenizer()
    text = "aé日🙂z"
    detok = IncrementalText(tok)
    pieces = [detok.push(b) for b in text.encode()]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert pieces[1] == "" and pieces[2] == "é"  # é is two bytes: nothing until the second


@pytest.mark.parametrize("stops,output,matched,trimmed", [
    (["lo w"], "hello world", "lo w", "hel"),
    (["xyz", "o"], "hello world", "o", "hell"),
    (["ld", "wor"], "hello world", "wor", "hello "),
    (["日本"], "ab日本cd", "日本", "ab"),
    (["zzz"], "hello", None, "hello"),
])
def test_stop_strings_match_across_tokens(stops, output, matched, trimmed):
    tok = card_for("tiny").load_tokenizer()
    stopper = StopStrings(tok, stops)
    seen = None
    for i, b in enumerate(output.encode()):
        seen = stopper.push(b)
        if seen is not None:
            assert output.encode()[:i + 1].decode(errors="ignore").endswith(seen)
            break
    assert seen == matched
    assert stopper.output_text(no_stop_trim=False) == trimmed


def _request(**sampling) -> pb.GenerateRequest:
    sp = pb.SamplingParams(temperature=0.0, top_p=1.0, top_k=-1)
    for k, v in sampling.items():
        setattr(sp, k, v) if not isinstance(v, list) else getattr(sp, k).extend(v)
    return pb.GenerateRequest(tokenized=pb.TokenizedInput(input_ids=[256, 1, 2]), sampling_params=sp)


def test_conversion_follows_sglangs_semantics():
    card = card_for("tiny")
    spec = parse_generate(_request(), card)
    assert spec.max_new_tokens == card.max_context_length - 3  # absent = up to the context length
    assert spec.sampling.max_new_tokens == spec.max_new_tokens and spec.sampling.top_k == -1
    assert spec.request_id.startswith("req-") and not spec.sampling.HasField("seed")
    spec = parse_generate(_request(max_new_tokens=5, seed=7, stop_token_ids=[9], top_k=0), card)
    assert (spec.max_new_tokens, spec.sampling.seed, list(spec.sampling.stop_token_ids)) == (5, 7, [9])
    held = parse_generate(_request(max_new_tokens=5, stop_token_ids=[9], min_new_tokens=2), card)
    assert held.sampling.min_new_tokens == 2 and list(held.sampling.stop_token_ids) == [9]
    assert not held.sampling.ignore_eos and not held.sampling.logprobs  # the workers mask EOS and stops
    with pytest.raises(InvalidRequest, match="max_new_tokens=5 is out of range: allowed 1..4"):
        parse_generate(_request(max_new_tokens=5), card, max_new_tokens_limit=4)
    with pytest.raises(InvalidRequest, match="min_new_tokens=6 exceeds max_new_tokens=5"):
        parse_generate(_request(max_new_tokens=5, min_new_tokens=6), card)
    with pytest.raises(InvalidRequest, match="temperature=nan"):
        parse_generate(_request(temperature=float("nan")), card)


def test_the_router_checks_by_the_floors_bounds_and_sends_the_floors_parameters():
    """What the router sends is the floor's SamplingParams as the worker message carries it (the workers read it
    back equal), and a public value outside a floor bound is refused in the public field's name."""
    card = card_for("tiny")
    req = _request(temperature=0.5, top_p=0.9, top_k=0, repetition_penalty=0.0, seed=3, max_new_tokens=8)
    req.sampling_params.logit_bias["7"] = 2.0
    spec = parse_generate(req, card)
    assert sampling_from_proto(spec.sampling) == SamplingParams(
        temperature=float(pb.SamplingParams(temperature=0.5).temperature), top_k=0,
        top_p=float(pb.SamplingParams(top_p=0.9).top_p), seed=3, max_new_tokens=8, logit_bias=((7, 2.0),))
    for field, value in [("top_p", 0.0), ("top_k", -2), ("repetition_penalty", -1.0), ("seed", 2**63),
                         ("min_p", 1.0), ("presence_penalty", math.inf)]:
        with pytest.raises(InvalidRequest) as err:
            parse_generate(_request(**{field: value}), card)
        assert str(err.value) == f"sampling_params.{BOUNDS[field].error(field, value)}", field


class _CountingTokenizer:
    """The tiny tokenizer, counting decode calls."""

    def __init__(self):
        self.inner, self.decodes = card_for("tiny").load_tokenizer(), 0

    def decode(self, ids, skip_special_tokens=True):
        self.decodes += 1
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def _flow(max_new: int, stops: tuple[str, ...] = ()):
    from sparsepd.router.flow import Flow

    card, tok = card_for("tiny"), _CountingTokenizer()
    spec = parse_generate(_request(max_new_tokens=max_new, stop=list(stops)), card, card.prompt_encoder())
    return Flow(spec, StopStrings(tok, list(spec.stop))), tok


def test_tokens_without_stop_strings_are_taken_whole_and_decoded_once():
    flow, tok = _flow(max_new=10)
    step_tokens = [[104, 101], [108], [108, 111, 32], [119, 195, 182, 114, 108, 100]]  # "hello wörld"
    taken = [flow.take(ids) for ids in step_tokens]
    assert taken[:3] == [([104, 101], None), ([108], None), ([108, 111, 32], None)]
    new, outcome = taken[3]
    assert new == [119, 195, 182, 114] and outcome.finish_reason == "length"  # cut at max_new_tokens = 10
    assert flow.output_ids == [104, 101, 108, 108, 111, 32, 119, 195, 182, 114]
    assert tok.decodes == 0  # no per-token decoding when no stop string is watched
    assert flow.output_text() == "hello wör" and tok.decodes == 1


def test_tokens_with_stop_strings_are_checked_one_by_one():
    flow, tok = _flow(max_new=20, stops=("lo w",))
    new, outcome = flow.take(list(b"hello world"))
    assert bytes(new) == b"hello w" and outcome.matched_stop_str == "lo w"  # the rest of the step is dropped
    assert tok.decodes > 0 and flow.output_text() == "hel"
