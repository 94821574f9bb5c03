"""The one rule for a prompt's special tokens (sparsepd/prompt_encoding.py): taken from the tokenizer's own
configuration (tokenizer_config.json's add_bos_token / add_eos_token, else tokenizer.json's post-processor),
never doubled. The shipped tiny files add none (as the SGLang gateway encodes a completion); the variants
below put a BOS-adding post-processor in or set the flags."""

import json

import pytest

from sparsepd.prompt_encoding import PromptEncoder, SpecialTokens
from sparsepd.router.model_card import MODELS_DIR, card_for

BOS, EOS = 256, 257


def _files(post_processor_bos: bool = False, **config_changes) -> dict[str, bytes]:
    """The tiny model's tokenizer files; tokenizer.json given a post-processor that prepends the BOS when asked,
    tokenizer_config.json changed (a value None drops the key)."""
    from tokenizers import Tokenizer, processors

    files = dict(card_for("tiny").files)
    if post_processor_bos:
        tok = Tokenizer.from_str(files["tokenizer.json"].decode())
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, BOS)])
        files["tokenizer.json"] = tok.to_str().encode()
    config = json.loads(files["tokenizer_config.json"])
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    files["tokenizer_config.json"] = json.dumps(config).encode()
    return files


def test_the_tiny_tokenizer_adds_no_special_token_as_its_configuration_says():
    encoder = card_for("tiny").prompt_encoder()
    assert encoder.specials == SpecialTokens()
    assert encoder.encode("Hello") == list(b"Hello")
    assert encoder.encode("héllo ✓") == list("héllo ✓".encode())
    assert encoder.encode("") == []
    assert encoder.encode("<|begin_of_text|>Hi") == [BOS, *b"Hi"]  # a special token spelt out is that token


@pytest.mark.parametrize("variant", [{}, {"post_processor_bos": True, "add_bos_token": None},
                                     {"post_processor_bos": True, "add_bos_token": True}],
                         ids=["shipped", "post-processor", "both"])
def test_the_rule_agrees_with_transformers_where_the_files_agree(tmp_path, variant):
    """(Where the flag and the post-processor disagree, transformers' generic tokenizer follows the
    post-processor; the rule, as transformers' Llama-style tokenizers, follows the flag.)"""
    transformers = pytest.importorskip("transformers")
    for name, data in _files(**variant).items():
        (tmp_path / name).write_bytes(data)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    encoder = PromptEncoder.from_directory(tmp_path)
    assert encoder.specials == (SpecialTokens() if not variant else SpecialTokens(prefix=(BOS,)))
    for text in ("Hello", " a  b\n", "héllo ✓"):
        assert encoder.encode(text) == hf(text).input_ids, text


def test_the_configuration_wins_over_the_post_processor():
    off = PromptEncoder.from_files(_files(post_processor_bos=True))  # tiny's config: add_bos_token false
    assert off.specials == SpecialTokens() and off.encode("Hi") == list(b"Hi")
    on = PromptEncoder.from_files(_files(add_bos_token=True))
    assert on.encode("Hi") == [BOS, *b"Hi"]
    both = PromptEncoder.from_files(_files(add_bos_token=True, add_eos_token=True))
    assert both.encode("Hi") == [BOS, *b"Hi", EOS]
    eos_only = PromptEncoder.from_files(_files(post_processor_bos=True, add_bos_token=False, add_eos_token=True))
    assert eos_only.encode("Hi") == [*b"Hi", EOS]


def test_without_a_setting_the_post_processor_decides():
    unset = PromptEncoder.from_files(_files(post_processor_bos=True, add_bos_token=None, add_eos_token=None))
    assert unset.specials == SpecialTokens(prefix=(BOS,)) and unset.encode("Hi") == [BOS, *b"Hi"]
    files = _files(post_processor_bos=True)
    del files["tokenizer_config.json"]
    assert PromptEncoder.from_files(files).encode("Hi") == [BOS, *b"Hi"]
    plain = _files(add_bos_token=None, add_eos_token=None)
    assert PromptEncoder.from_files(plain).encode("Hi") == list(b"Hi")


def test_a_special_token_the_text_already_spells_out_is_not_added_again():
    both = PromptEncoder.from_files(_files(add_bos_token=True, add_eos_token=True))
    assert both.encode("<|begin_of_text|>Hi") == [BOS, *b"Hi", EOS]
    assert both.encode("Hi<|end_of_text|>") == [BOS, *b"Hi", EOS]
    assert both.encode("<|begin_of_text|>") == [BOS, EOS]
    assert both.encode("") == [BOS, EOS]


def test_a_configuration_naming_an_unknown_token_is_refused():
    with pytest.raises(ValueError, match=r"model/tokenizer_config.json: add_bos_token is true but "
                                         r"bos_token='<s>' is not a token"):
        PromptEncoder.from_files(_files(add_bos_token=True, bos_token="<s>"), "model/")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        PromptEncoder.from_files({**card_for("tiny").files, "tokenizer_config.json": b"{"})
    assert PromptEncoder.from_files({"tokenizer_config.json": b"{}"}) is None  # no tokenizer.json: no text


def test_the_shipped_files_are_the_ones_the_router_serves():
    assert PromptEncoder.from_directory(MODELS_DIR / "tiny").specials == card_for("tiny").prompt_encoder().specials
