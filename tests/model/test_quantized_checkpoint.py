"""Checkpoints into a model that keeps its weights quantized: FP8 projections and FP4 experts are kept byte for byte
as stored (scales as fp32 tiles and ue8m0 bytes), in our form and in the published one; a quantized checkpoint
loads quantized by default and dequantized with --dtype bf16; what cannot be kept is refused by name."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import prompt
from safetensors.torch import load_file, save_file
from test_checkpoint import CONFIG

from sparsepd.load_options import LoadOptions, resolve_model_config
from sparsepd.model.linear import FP8_PROJECTIONS, ROUTED_EXPERTS
from sparsepd.model.weights import CheckpointError, build_model, read_config, save_checkpoint
from sparsepd.model_config import get_preset


@pytest.fixture(scope="module")
def quantized():
    """tiny with FP4-able experts and the HCA ratio of test_checkpoint's published CONFIG."""
    cfg = get_preset("tiny", moe_inter_dim=64, weight_format="fp8_fp4", compress_ratios=(0, 4, 128, 4, 0),
                     page_size=128)
    return build_model(cfg, seed=2, load_format="dummy")


def test_our_form_round_trip_keeps_the_bytes(quantized, tmp_path):
    save_checkpoint(quantized, tmp_path)
    cfg = read_config(tmp_path)
    assert cfg == quantized.cfg and cfg.weight_format == "fp8_fp4"
    loaded = build_model(cfg, checkpoint=tmp_path)
    want, got = quantized.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k].view(torch.uint8) if got[k].dtype ==
               torch.float8_e4m3fn else got[k], want[k].view(torch.uint8) if want[k].dtype == torch.float8_e4m3fn
               else want[k]) for k in want)
    ids = prompt(40, seed=1)
    assert torch.equal(loaded.prefill(ids)[0], quantized.prefill(ids)[0])


def published_from(model, directory) -> dict[str, torch.Tensor]:
    """`model`'s weights in the published layout: FP8 e4m3 + e8m0 tile scales, FP4 int8 + e8m0 per-32 scales,
    plain weights in bf16 (fp32 where V4 keeps fp32), config.json with the official keys."""
    save_checkpoint(model, directory)
    tensors = load_file(str(directory / "model.safetensors"))
    for name in list(tensors):
        scale = name[: -len("weight")] + "scale"
        if FP8_PROJECTIONS.search(name):
            tensors[scale] = tensors[scale].to(torch.float8_e8m0fnu)  # powers of two: exact
        elif ROUTED_EXPERTS.search(name):
            tensors[name] = tensors[name].view(torch.int8)
        elif tensors[name].dtype == torch.float32 and not re.search(r"attn_sink|hc_|gate\.bias|compressor\.", name):
            tensors[name] = tensors[name].to(torch.bfloat16)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({**CONFIG, "moe_intermediate_size": 64}))
    return tensors


def test_published_checkpoint_stays_quantized_by_default(quantized, tmp_path):
    stored = published_from(quantized, tmp_path)
    cfg = resolve_model_config("tiny", str(tmp_path))
    assert (cfg.weight_format, cfg.dtype) == ("fp8_fp4", "bfloat16")
    loaded = build_model(cfg, checkpoint=tmp_path).state_dict()
    for name, value in stored.items():
        if FP8_PROJECTIONS.search(name):
            assert torch.equal(loaded[name].view(torch.uint8), value.view(torch.uint8)), name
        elif ROUTED_EXPERTS.search(name):
            assert torch.equal(loaded[name], value.view(torch.uint8)), name
        elif name.endswith(".scale"):
            weight = name[: -len("scale")] + "weight"
            want = value.view(torch.uint8) if ROUTED_EXPERTS.search(weight) else value.float()
            assert torch.equal(loaded[name], want), name
    plain = resolve_model_config("tiny", str(tmp_path), LoadOptions(dtype="bf16"))
    assert (plain.weight_format, plain.dtype) == ("plain", "bfloat16")
    dequantized = build_model(plain, checkpoint=tmp_path).state_dict()
    assert dequantized["layers.1.ffn.experts.3.w2.weight"].dtype == torch.bfloat16


def test_fp8_experts_are_dequantized_in_the_fp8_format(tmp_path):
    """A quantized checkpoint whose experts are not FP4 (or whose dims FP4 cannot take): FP8 projections kept,
    experts plain."""
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG, "expert_dtype": "fp8", "quantization_config": {
        **CONFIG["quantization_config"], "expert_dtype": "fp8"}, "moe_intermediate_size": 64}))
    assert resolve_model_config("tiny", str(tmp_path)).weight_format == "fp8"
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))  # moe_intermediate_size 48: not a multiple of 32
    assert resolve_model_config("tiny", str(tmp_path)).weight_format == "fp8"


def _edit(directory, name, make):
    tensors = load_file(str(directory / "model.safetensors"))
    tensors[name] = make(tensors[name]).contiguous()
    save_file(tensors, str(directory / "model.safetensors"))


WQ_B, EXPERT = "layers.0.attn.wq_b", "layers.1.ffn.experts.3.w2"
REFUSED = {  # case: (tensor, edit, what the error says)
    "fp8 projection stored bf16": (WQ_B + ".weight", lambda w: w.float().to(torch.bfloat16), "dtype bf16"),
    "expert stored fp8": (EXPERT + ".weight", lambda w: torch.zeros(64, 64, dtype=torch.float8_e4m3fn), "packed FP4"),
    "fp4 scale not a power of two": (EXPERT + ".scale", lambda s: s.float() * 3, "ue8m0"),
    "fp4 scale grid": (EXPERT + ".scale", lambda s: s[:, :1], "expected (64, 2)"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_cannot_stay_quantized_is_refused_by_name(quantized, tmp_path, case):
    name, make, needle = REFUSED[case]
    published_from(quantized, tmp_path)
    _edit(tmp_path, name, make)
    cfg = resolve_model_config("tiny", str(tmp_path))
    with pytest.raises(CheckpointError, match=re.escape(name)) as err:
        build_model(cfg, checkpoint=tmp_path)
    assert needle in str(err.value), err.value
    print(f"{case}: {err.value}")
