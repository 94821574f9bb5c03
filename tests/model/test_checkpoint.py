"""A checkpoint directory in the published DeepSeek-V4 layout: config.json with the official keys, two
safetensors shards and their index, FP8 e4m3 projections and packed-FP4 routed experts with e8m0 scales,
mtp.* tensors, tokenizer files. It loads to the same logits as its weights given dequantized; its config
maps to the expected ModelConfig (and transformers reads it alike); bad ones are refused by name."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import prompt
from safetensors.torch import load_file, save_file

from sparsepd.checkpoint_config import CheckpointConfigError, read_checkpoint_config
from sparsepd.engine.config import EngineConfig
from sparsepd.load_options import LoadOptions
from sparsepd.model.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from sparsepd.model.transformer import Transformer
from sparsepd.model.weights import CheckpointError, build_model, load_checkpoint
from sparsepd.model_config import ModelConfig, get_preset
from sparsepd.router.model_card import MODELS_DIR, card_for

RATIOS = (0, 4, 128, 4, 0)
# The tiny preset's sizes in the official keys (HCA ratio 128, the published one; a trailing MTP ratio).
CONFIG = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 260, "hidden_size": 64,
    "num_hidden_layers": 5, "num_hash_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 96, "qk_rope_head_dim": 32, "q_lora_rank": 48, "o_groups": 2, "o_lora_rank": 32,
    "sliding_window": 16, "compress_ratios": [*RATIOS, 0], "rope_theta": 10000, "compress_rope_theta": 160000,
    "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 256, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "index_n_heads": 4, "index_head_dim": 128, "index_topk": 4, "n_routed_experts": 8, "num_experts_per_tok": 2,
    "n_shared_experts": 1, "moe_intermediate_size": 48, "routed_scaling_factor": 1.5, "swiglu_limit": 10.0,
    "scoring_func": "sqrtsoftplus", "norm_topk_prob": True, "topk_method": "noaux_tc", "hc_mult": 4,
    "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "max_position_embeddings": 1024,
    "bos_token_id": 256, "eos_token_id": 257, "num_nextn_predict_layers": 1, "tie_word_embeddings": False,
    "hidden_act": "silu", "torch_dtype": "bfloat16", "expert_dtype": "fp4", "transformers_version": "4.57.1",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
}
FP8 = re.compile(r"(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|indexer\.wq_b|shared_experts\.w[123])\.weight$")
FP4 = re.compile(r"\.ffn\.experts\.\d+\.w[123]\.weight$")
FP32 = re.compile(r"(attn_sink|hc_\w+|gate\.bias|compressor\.(ape|wkv\.weight|wgate\.weight))$")
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
INDEX = "model.safetensors.index.json"


def preset_named(preset: str, name: str, **overrides: object) -> ModelConfig:
    return ModelConfig(**{**get_preset(preset).model_dump(), "name": name, **overrides})


def expected_config(directory: Path) -> ModelConfig:
    return preset_named("tiny", directory.name, compress_ratios=RATIOS, dtype="bfloat16", page_size=128)


# --- the format, written and read back independently of the loader ---------------------------------
def pow2_scale(amax: torch.Tensor, top: float) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(amax.clamp(min=1e-30) / top)))


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 `[R, C]` and e8m0 scales `[⌈R/128⌉, ⌈C/128⌉]` (partial tiles at the edges)."""
    rows, cols = w.shape
    grid = torch.zeros(math.ceil(rows / 128) * 128, math.ceil(cols / 128) * 128)
    grid[:rows, :cols] = w.abs()
    scale = pow2_scale(grid.unflatten(0, (-1, 128)).unflatten(2, (-1, 128)).amax((1, 3)), 448.0)
    q = (w / tile_expand(scale, rows, cols, 128, 128)).to(torch.float8_e4m3fn)
    return q, scale.to(torch.float8_e8m0fnu)


def quantize_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e2m1 codes packed two a byte (low nibble = even column) as int8 `[R, C/2]`, e8m0 scales `[R, ⌈C/32⌉]`."""
    rows, cols = w.shape
    grid = torch.zeros(rows, math.ceil(cols / 32) * 32)
    grid[:, :cols] = w.abs()
    scale = pow2_scale(grid.unflatten(1, (-1, 32)).amax(-1), 6.0)
    x = w / tile_expand(scale, rows, cols, 1, 32)
    code = (x.abs()[..., None] - E2M1).abs().argmin(-1)
    code = code | (((x < 0) & (code > 0)).long() << 3)
    return (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8).view(torch.int8), scale.to(torch.float8_e8m0fnu)


def tile_expand(scale: torch.Tensor, rows: int, cols: int, block_rows: int, block_cols: int) -> torch.Tensor:
    return scale[torch.arange(rows) // block_rows][:, torch.arange(cols) // block_cols]


def e8m0_value(scale: torch.Tensor) -> torch.Tensor:
    return torch.exp2(scale.view(torch.uint8).double() - 127).float()


def fp4_value(packed: torch.Tensor) -> torch.Tensor:
    """e2m1 by its bits: sign, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 is subnormal."""
    b = packed.view(torch.uint8).long()
    code = torch.stack([b & 15, b >> 4], -1).flatten(-2)
    e, m = (code >> 1) & 3, (code & 1).float()
    magnitude = torch.where(e == 0, 0.5 * m, torch.exp2(e.float() - 1) * (1 + 0.5 * m))
    return torch.where(code >= 8, -magnitude, magnitude)


def write_published(directory: Path, seed: int = 3) -> dict[str, torch.Tensor]:
    """Write the checkpoint; return the model's parameters as the checkpoint holds them, dequantized."""
    model = build_model(expected_config(directory), seed=seed)
    stored, expected = {}, {}
    for name, p in model.state_dict().items():
        w, scale = p.float(), name[: -len("weight")] + "scale"
        if FP4.search(name):
            stored[name], stored[scale] = quantize_fp4(w)
            expected[name] = fp4_value(stored[name]) * tile_expand(e8m0_value(stored[scale]), *w.shape, 1, 32)
        elif FP8.search(name):
            stored[name], stored[scale] = quantize_fp8(w)
            expected[name] = stored[name].float() * tile_expand(e8m0_value(stored[scale]), *w.shape, 128, 128)
        elif name.endswith("tid2eid"):
            stored[name], expected[name] = p.to(torch.int32), p
        else:
            stored[name] = w if FP32.search(name) else p.to(torch.bfloat16)
            expected[name] = stored[name]
    mtp_w, mtp_s = quantize_fp4(torch.randn(48, 64))
    stored.update({"mtp.0.enorm.weight": torch.ones(64, dtype=torch.bfloat16),
                   "mtp.0.ffn.experts.0.w1.weight": mtp_w, "mtp.0.ffn.experts.0.w1.scale": mtp_s})
    names = sorted(stored)
    weight_map = {n: SHARDS[i >= len(names) // 2] for i, n in enumerate(names)}
    weight_map["layers.0.attn.wq_b.scale"] = SHARDS[weight_map["layers.0.attn.wq_b.weight"] == SHARDS[0]]
    for shard in SHARDS:  # the scale above sits in the other shard than its weight
        save_file({n: stored[n].contiguous() for n in names if weight_map[n] == shard}, str(directory / shard))
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(CONFIG, indent=1))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODELS_DIR / "tiny" / f, directory / f)
    return expected


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    directory = tmp_path_factory.mktemp("DeepSeek-V4-tiny")
    return directory, write_published(directory)


# --- loading --------------------------------------------------------------------------------------
def test_published_checkpoint_gives_the_logits_of_its_dequantized_weights(published):
    directory, expected = published
    cfg = read_checkpoint_config(directory)
    assert cfg == expected_config(directory)
    loaded = build_model(cfg, checkpoint=directory)
    reference = Transformer(cfg)
    reference.load_state_dict(expected, strict=True)
    got, want = loaded.state_dict(), reference.eval().state_dict()
    differ = [n for n in want if not torch.equal(got[n], want[n])]
    assert not differ, f"parameters differ from the dequantized ones: {differ[:5]}"
    ids = prompt(140, seed=5)  # crosses the HCA ratio 128: a committed entry in every compressed layer
    logits, want_logits = loaded.prefill(ids)[0], reference.prefill(ids)[0]
    assert torch.isfinite(logits).all()
    diff = (logits - want_logits).abs()
    assert torch.equal(logits, want_logits), (f"prompt seed 5, 140 tokens: max |Δ| {float(diff.max()):.3g} at "
                                              f"(token, vocab) {divmod(int(diff.argmax()), diff.shape[1])}")


def test_worker_config_and_tokenizer_come_from_the_directory(published):
    directory, _ = published
    cfg = expected_config(directory)
    # A quantized checkpoint stays quantized (FP8 projections; experts 48 wide cannot be FP4); --dtype bf16: plain.
    assert (EngineConfig(preset="bench", checkpoint=str(directory)).resolve_model_config()
            == cfg.model_copy(update={"weight_format": "fp8"}))
    bf16 = LoadOptions(dtype="bf16")
    assert EngineConfig(preset="bench", checkpoint=str(directory), load=bf16).resolve_model_config() == cfg
    tok = load_tokenizer(cfg, directory)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("héllo, V4") == ByteTokenizer(260, 256, 257).encode("héllo, V4")
    card = card_for("tiny", str(directory))
    assert (card.vocab_size, card.max_context_length, card.bos_id, card.eos_id, card.page_size) == (
        cfg.vocab_size, cfg.max_seq_len, cfg.bos_id, cfg.eos_id, cfg.page_size)
    with zipfile.ZipFile(io.BytesIO(card.tokenizer_zip())) as zf:  # what GetTokenizer hands to clients
        assert zf.read("tokenizer_config.json") == (directory / "tokenizer_config.json").read_bytes()
        assert "chat_template" in json.loads(zf.read("tokenizer_config.json"))


def test_tokenizer_specials_must_match_the_config(published):
    directory, _ = published
    cfg = get_preset("tiny", eos_id=258)  # tokenizer_config.json names <|end_of_text|>, id 257
    with pytest.raises(ValueError, match=r"eos token '<\|end_of_text\|>' has id 257.*eos_token_id=258"):
        load_tokenizer(cfg, directory)


def test_transformers_reads_the_config_alike(published):
    directory, _ = published
    module = pytest.importorskip("transformers.models.deepseek_v4.configuration_deepseek_v4")
    hf = module.DeepseekV4Config.from_json_file(str(directory / "config.json"))
    ours = read_checkpoint_config(directory)
    ratio = {"sliding_attention": 0, "compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    assert (hf.vocab_size, hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.head_dim,
            hf.qk_rope_head_dim, hf.q_lora_rank, hf.o_groups, hf.o_lora_rank, hf.sliding_window) == (
        ours.vocab_size, ours.dim, ours.n_layers, ours.n_heads, ours.head_dim, ours.rope_dim, ours.q_lora_rank,
        ours.o_groups, ours.o_lora_rank, ours.window)
    assert tuple(ratio[t] for t in hf.layer_types) == ours.compress_ratios
    assert hf.mlp_layer_types.count("hash_moe") == ours.n_hash_layers
    assert (hf.n_routed_experts, hf.num_experts_per_tok, hf.moe_intermediate_size, hf.routed_scaling_factor,
            hf.index_n_heads, hf.index_topk, hf.hc_mult) == (
        ours.n_routed_experts, ours.n_activated_experts, ours.moe_inter_dim, ours.route_scale,
        ours.index_n_heads, ours.index_topk, ours.hc_mult)
    main, compress = hf.rope_parameters["main"], hf.rope_parameters["compress"]
    assert (main["rope_theta"], compress["rope_theta"], compress["factor"],
            compress["original_max_position_embeddings"]) == (
        ours.rope_theta, ours.compress_rope_theta, ours.rope_factor, ours.original_seq_len)


def test_the_published_v4_flash_config_maps_to_the_preset(tmp_path):
    """The V4-Flash numbers (docs/dsv4-spec.md; compress_ratios ships with one entry per MTP layer too)."""
    config = {**CONFIG, "vocab_size": 129280, "hidden_size": 4096, "num_hidden_layers": 43, "num_hash_layers": 3,
              "num_attention_heads": 64, "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024,
              "o_groups": 8, "o_lora_rank": 1024, "sliding_window": 128,
              "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "index_n_heads": 64, "index_topk": 512,
              "n_routed_experts": 256, "num_experts_per_tok": 6, "moe_intermediate_size": 2048,
              "max_position_embeddings": 1048576, "bos_token_id": 0, "eos_token_id": 1,
              "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                               "beta_fast": 32, "beta_slow": 1}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_checkpoint_config(tmp_path) == preset_named("v4-flash", tmp_path.name)


# --- refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,edit,needle", [
    ("unknown key", lambda c: c.update(foo_bar=1), "foo_bar"),
    ("missing key", lambda c: c.pop("hidden_size"), "hidden_size"),
    ("another architecture", lambda c: c.update(num_key_value_heads=8), "num_key_value_heads"),
    ("too few ratios", lambda c: c.update(compress_ratios=[0, 4]), "compress_ratios"),
    ("not yarn", lambda c: c["rope_scaling"].update(type="linear"), "rope_scaling"),
    ("unknown quantization", lambda c: c["quantization_config"].update(quant_method="awq"), "quant_method"),
])
def test_bad_config_is_refused_with_the_key_and_the_file(tmp_path, case, edit, needle):
    config = json.loads(json.dumps(CONFIG))
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointConfigError, match=rf"{re.escape(str(tmp_path / 'config.json'))}.*{needle}"):
        read_checkpoint_config(tmp_path)


def _edit_shards(directory: Path, edit, keep_index: bool = False) -> None:
    """Apply `edit(tensors)` to the union of the shards; each tensor stays in its shard, new ones go to the
    first; the index then lists what the shards hold (or keeps its old entries with `keep_index`)."""
    index = json.loads((directory / INDEX).read_text())
    tensors = {n: t for shard in SHARDS for n, t in load_file(str(directory / shard)).items()}
    edit(tensors)
    weight_map = {n: index["weight_map"].get(n, SHARDS[0]) for n in tensors}
    for shard in SHARDS:
        save_file({n: t.contiguous() for n, t in tensors.items() if weight_map[n] == shard}, str(directory / shard))
    if not keep_index:
        (directory / INDEX).write_text(json.dumps({**index, "weight_map": weight_map}))


def _set(name, make):
    return lambda t: t.__setitem__(name, make(t[name]))


def _drop(name):
    return lambda t: t.pop(name)


WQ_B, EXPERT, TABLE = "layers.0.attn.wq_b", "layers.1.ffn.experts.3.w2", "layers.0.ffn.gate.tid2eid"
BAD_WEIGHTS = {  # case: (edit, the name the error must give)
    "scale dtype": (_set(EXPERT + ".scale", lambda s: s.float().to(torch.bfloat16)), EXPERT + ".scale"),
    "weight dtype": (_set("layers.0.attn_norm.weight", lambda w: w.to(torch.int32)), "layers.0.attn_norm.weight"),
    "expert not fp4": (_set(EXPERT + ".weight", lambda w: torch.zeros(64, 48, dtype=torch.float8_e4m3fn)),
                       EXPERT + ".weight"),
    "table dtype": (_set(TABLE, lambda t: t.float()), TABLE),
    "table values": (_set(TABLE, lambda t: t + 8), TABLE),
    "missing scale": (_drop(WQ_B + ".scale"), WQ_B + ".scale"),
    "fp8 tile grid": (_set(WQ_B + ".scale", lambda s: s[:2]), WQ_B + ".scale"),
    "fp4 block grid": (_set(EXPERT + ".scale", lambda s: s[:, :1]), EXPERT + ".scale"),
    "packed shape": (_set(EXPERT + ".weight", lambda w: w[:, :-1]), EXPERT + ".weight"),
    "missing tensor": (_drop("layers.2.attn.compressor.wkv.weight"), "layers.2.attn.compressor.wkv.weight"),
    "index names an absent tensor": (_drop("layers.4.ffn_norm.weight"), "layers.4.ffn_norm.weight"),
    "extra tensor": (lambda t: t.update({"layers.9.surprise.weight": torch.zeros(2)}), "layers.9.surprise.weight"),
}


@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_bad_weights_are_refused_by_name(published, tmp_path, case):
    edit, name = BAD_WEIGHTS[case]
    directory = tmp_path / "ckpt"
    shutil.copytree(published[0], directory)
    _edit_shards(directory, edit, keep_index=case == "index names an absent tensor")
    with pytest.raises(CheckpointError, match=re.escape(name)) as err:
        load_checkpoint(Transformer(expected_config(published[0])), directory)
    print(f"{case}: {err.value}")
