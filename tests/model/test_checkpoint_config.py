"""config.json spellings: the published DeepSeek-V4 keys and what transformers 5 writes when it saves a V4 config
(`layer_types` + `compress_rates`, `mlp_layer_types`, `partial_rotary_factor`, nested `rope_parameters`, `dtype`,
metadata) read to the same ModelConfig; wrong values, disagreeing spellings and unknown keys are refused by name."""

from __future__ import annotations

import copy
import json
import re

import pytest
from test_checkpoint import CONFIG

from sparsepd.checkpoint_config import CheckpointConfigError, read_checkpoint_config

KINDS = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}


def published() -> dict:
    return copy.deepcopy(CONFIG)


def transformers5(config: dict) -> dict:
    """The same model in the keys transformers 5's DeepseekV4Config writes (save_pretrained), none of the
    published spellings left."""
    c = copy.deepcopy(config)
    ratios, hashed, rope_dim = c.pop("compress_ratios"), c.pop("num_hash_layers"), c.pop("qk_rope_head_dim")
    scaling, c["dtype"] = c.pop("rope_scaling"), c.pop("torch_dtype")
    factor = rope_dim / c["head_dim"]
    c.update(
        layer_types=[KINDS[r] for r in ratios[: c["num_hidden_layers"]]],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        mlp_layer_types=["hash_moe"] * hashed + ["moe"] * (c["num_hidden_layers"] - hashed),
        partial_rotary_factor=factor,
        rope_parameters={
            "main": {"rope_type": "default", "rope_theta": c["rope_theta"], "partial_rotary_factor": factor},
            "compress": {**scaling, "rope_type": "yarn", "rope_theta": c["compress_rope_theta"],
                         "partial_rotary_factor": factor, "attention_factor": 1.0}},
        transformers_version="5.25.0", mlp_bias=False, output_router_logits=False, router_aux_loss_coef=0.001,
        router_jitter_noise=0.0, pad_token_id=None, initializer_range=0.02, use_cache=True,
    )
    return c


def read(tmp_path, config: dict):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return read_checkpoint_config(tmp_path)


@pytest.fixture
def expected(tmp_path):
    return read(tmp_path, published())


def test_the_transformers5_form_reads_like_the_published_one(tmp_path, expected):
    assert read(tmp_path, transformers5(CONFIG)) == expected


def test_what_transformers_writes_reads_like_the_published_one(tmp_path, expected):
    """transformers' own save_pretrained of the published config (skipped where transformers lacks deepseek_v4)."""
    module = pytest.importorskip("transformers.models.deepseek_v4.configuration_deepseek_v4")
    module.DeepseekV4Config.from_dict(published()).save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in saved and "layer_types" in saved and "rope_scaling" not in saved
    assert read_checkpoint_config(tmp_path) == expected


def _swap(drop: list[str], **add):
    def edit(c: dict) -> None:
        for key in drop:
            c.pop(key)
        c.update(copy.deepcopy(add))
    return edit


T5 = transformers5(CONFIG)
SPELLINGS = {  # each edit of the published config describes the same model
    "layer_types + compress_rates": _swap(["compress_ratios"], layer_types=T5["layer_types"],
                                          compress_rates=T5["compress_rates"]),
    "layer_types, default rates": _swap(["compress_ratios"], layer_types=T5["layer_types"]),
    "layer_types with an MTP tail": _swap(["compress_ratios"], layer_types=[*T5["layer_types"], "sliding_attention"]),
    "both layer spellings": _swap([], layer_types=T5["layer_types"]),
    "mlp_layer_types": _swap(["num_hash_layers"], mlp_layer_types=T5["mlp_layer_types"]),
    "both hash spellings": _swap([], mlp_layer_types=T5["mlp_layer_types"]),
    "partial_rotary_factor": _swap(["qk_rope_head_dim"], partial_rotary_factor=T5["partial_rotary_factor"]),
    "nested rope_parameters": _swap(["rope_scaling"], rope_parameters=T5["rope_parameters"]),
    "flat rope_parameters": _swap(["rope_scaling"], rope_parameters={**CONFIG["rope_scaling"], "rope_theta": 10000}),
    "rope_scaling and rope_parameters": _swap([], rope_parameters=T5["rope_parameters"]),
    "dtype": _swap(["torch_dtype"], dtype="bfloat16"),
    "dtype and torch_dtype": _swap([], dtype="bfloat16"),
    "metadata": _swap([], transformers_version="5.0.0", output_router_logits=False, router_aux_loss_coef=0.01,
                      router_jitter_noise=0.0, mlp_bias=False, output_hidden_states=False, return_dict=True,
                      tokenizer_class="PreTrainedTokenizerFast"),
}


@pytest.mark.parametrize("case", list(SPELLINGS))
def test_each_spelling_is_accepted(tmp_path, expected, case):
    config = published()
    SPELLINGS[case](config)
    assert read(tmp_path, config) == expected


def test_plain_rope_in_the_nested_form(tmp_path):
    """compress rope_type 'default' means no YaRN on the compressed layers, like an absent rope_scaling."""
    config = published()
    config.pop("rope_scaling")
    want = read(tmp_path, config)
    config["rope_parameters"] = {"main": {"rope_type": "default"}, "compress": {"rope_type": "default"}}
    got = read(tmp_path, config)
    assert got == want and (got.rope_factor, got.original_seq_len) == (1.0, 0)


def test_rope_thetas_come_from_the_nested_form(tmp_path):
    config = transformers5(CONFIG)
    for key in ("rope_theta", "compress_rope_theta"):
        config.pop(key)
    config["rope_parameters"]["main"]["rope_theta"] = 20000
    config["rope_parameters"]["compress"]["rope_theta"] = 320000
    got = read(tmp_path, config)
    assert (got.rope_theta, got.compress_rope_theta) == (20000.0, 320000.0)


def _set(path: str, value):
    def edit(c: dict) -> None:
        *parents, leaf = path.split(".")
        for p in parents:
            c = c[p]
        c[leaf] = copy.deepcopy(value)
    return edit


REFUSED = {  # case: (edit of the published config, what the error must name)
    "layer kinds disagree": (_set("layer_types", ["sliding_attention"] * 5), "layer_types"),
    "unknown layer kind": (_swap(["compress_ratios"], layer_types=["full_attention"] * 5), "full_attention"),
    "csa rate not 4": (_set("compress_rates", {"compressed_sparse_attention": 8}), "compressed_sparse_attention"),
    "hca rate 4": (_set("compress_rates", {"heavily_compressed_attention": 4}), "heavily_compressed_attention"),
    "unknown rate key": (_set("compress_rates", {"linear_attention": 2}), "compress_rates"),
    "hash layers not first": (_swap(["num_hash_layers"], mlp_layer_types=["moe", "hash_moe", "moe", "moe", "moe"]),
                              "mlp_layer_types"),
    "hash count disagrees": (_set("mlp_layer_types", ["hash_moe"] * 2 + ["moe"] * 3), "mlp_layer_types"),
    "unknown mlp kind": (_swap(["num_hash_layers"], mlp_layer_types=["dense"] * 5), "mlp_layer_types"),
    "rotary factor not whole": (_swap(["qk_rope_head_dim"], partial_rotary_factor=0.3), "partial_rotary_factor"),
    "rotary dims disagree": (_set("partial_rotary_factor", 0.5), "partial_rotary_factor"),
    "main rope not plain": (_swap(["rope_scaling"], rope_parameters={
        "main": {"rope_type": "yarn"}, "compress": T5["rope_parameters"]["compress"]}),
        "rope_parameters.main"),
    "attention factor": (_set("rope_parameters", {"main": {}, "compress": {
        **T5["rope_parameters"]["compress"], "attention_factor": 1.277}}), "attention_factor"),
    "yarn factor disagrees": (_set("rope_parameters", {"main": {}, "compress": {
        **T5["rope_parameters"]["compress"], "factor": 8}}), "rope_parameters.compress"),
    "compress theta disagrees": (_set("rope_parameters", {"main": {}, "compress": {
        **T5["rope_parameters"]["compress"], "rope_theta": 10000}}), "compress_rope_theta"),
    "unknown rope entry": (_set("rope_parameters", {"main": {}, "compress": {}, "global": {}}), "global"),
    "unknown yarn key": (_swap(["rope_scaling"], rope_parameters={**CONFIG["rope_scaling"], "low_freq_factor": 1}),
                         "low_freq_factor"),
    "flat theta disagrees": (_swap(["rope_scaling"], rope_parameters={**CONFIG["rope_scaling"], "rope_theta": 1e6}),
                             "rope_theta"),
    "dtype float16": (_swap(["torch_dtype"], dtype="float16"), "dtype"),
    "dtypes disagree": (_set("dtype", "float32"), "dtype"),
    "mlp bias": (_set("mlp_bias", True), "mlp_bias"),
    "no layer kinds": (_swap(["compress_ratios"]), "compress_ratios"),
    "no hash layers": (_swap(["num_hash_layers"]), "num_hash_layers"),
    "no rotary dims": (_swap(["qk_rope_head_dim"]), "qk_rope_head_dim"),
    "unknown key": (_set("sliding_window_pattern", 4), "sliding_window_pattern"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_wrong_values_are_refused_by_name(tmp_path, case):
    edit, needle = REFUSED[case]
    config = published()
    edit(config)
    with pytest.raises(CheckpointConfigError, match=re.escape(needle)) as err:
        read(tmp_path, config)
    assert str(tmp_path / "config.json") in str(err.value)
    print(f"{case}: {err.value}")
