import pytest

from sparsepd.model.tokenizer import ByteTokenizer
from sparsepd.model_config import PRESETS, get_preset


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="bench, tiny, v4-flash, v4-pro"):
        get_preset("huge")


def test_published_layer_patterns():
    flash, pro = get_preset("v4-flash"), get_preset("v4-pro")
    assert flash.compress_ratios[:4] == (0, 0, 4, 128) and flash.compress_ratios[-1] == 4
    assert [flash.compress_ratios.count(r) for r in (0, 4, 128)] == [2, 21, 20]
    assert pro.compress_ratios[:3] == (128, 128, 4) and len(pro.compress_ratios) == 61


def test_tiny_covers_every_layer_kind():
    tiny = PRESETS["tiny"]
    kinds = {tiny.layer_kind(i) for i in range(tiny.n_layers)}
    assert kinds == {"swa", "csa", "hca"} and tiny.n_hash_layers >= 1 and tiny.n_hash_layers < tiny.n_layers
    assert tiny.index_topk < 100 // 4  # a 100-token prompt commits more entries than top-k


def test_invalid_override_is_refused():
    with pytest.raises(ValueError, match="compress_ratios"):
        get_preset("tiny", n_layers=3)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer(260, 256, 257)
    ids = tok.encode("héllo ✓")
    assert ids == list("héllo ✓".encode()) and tok.decode([256, *ids, 257]) == "héllo ✓"
