"""--load-format / --dtype / --num-layers: the ModelConfig a process builds, the dummy weights it makes, the memory
plan of a preset."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch
from helpers import prompt

from sparsepd.fingerprint import deployment_fingerprint
from sparsepd.load_options import (
    LoadOptions,
    add_load_args,
    load_flags,
    load_options_from_args,
    resolve_model_config,
)
from sparsepd.model.weight_memory import planned_weight_bytes, weight_bytes
from sparsepd.model.weights import build_model
from sparsepd.model_config import ModelConfig, get_preset


def test_defaults_keep_todays_model():
    assert resolve_model_config("tiny", None) == get_preset("tiny")
    assert resolve_model_config("bench", None, LoadOptions()) == get_preset("bench")


@pytest.mark.parametrize("preset,fmt", [("bench", "fp8_fp4"), ("v4-flash", "fp8_fp4"), ("tiny", "fp8")])
def test_dummy_is_quantized_as_far_as_the_dims_allow(preset, fmt):
    cfg = resolve_model_config(preset, None, LoadOptions(load_format="dummy"))
    assert cfg == get_preset(preset).model_copy(update={"weight_format": fmt})  # tiny: moe_inter_dim 48


@pytest.mark.parametrize("dtype,want", [("bf16", "bfloat16"), ("fp32", "float32")])
def test_dtype_dequantizes_every_weight(dtype, want):
    cfg = resolve_model_config("bench", None, LoadOptions(load_format="dummy", dtype=dtype))
    assert (cfg.weight_format, cfg.dtype) == ("plain", want)


def test_num_layers_keeps_the_published_pattern():
    cfg = resolve_model_config("v4-flash", None, LoadOptions(load_format="dummy", num_layers=5))
    assert (cfg.n_layers, cfg.compress_ratios, cfg.n_hash_layers) == (5, (0, 0, 4, 128, 4), 3)
    pro = resolve_model_config("v4-pro", None, LoadOptions(num_layers=2))
    assert (pro.compress_ratios, pro.n_hash_layers) == ((128, 128), 2)
    assert pro.model_copy(update={"n_layers": 61, "compress_ratios": get_preset("v4-pro").compress_ratios,
                                  "n_hash_layers": 3}) == get_preset("v4-pro")


@pytest.mark.parametrize("n", [0, 44])
def test_num_layers_out_of_range_is_refused(n):
    with pytest.raises(ValueError, match="num_layers|greater than or equal"):
        resolve_model_config("v4-flash", None, LoadOptions(load_format="dummy", num_layers=n) if n else
                             LoadOptions.model_validate({"num_layers": n}))


def test_num_layers_with_checkpoint_weights_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--load-format dummy"):
        resolve_model_config("tiny", str(tmp_path), LoadOptions(num_layers=2))


def test_flags_round_trip():
    p = argparse.ArgumentParser()
    add_load_args(p)
    options = LoadOptions(load_format="dummy", dtype="bf16", num_layers=7)
    assert load_options_from_args(p.parse_args(load_flags(options))) == options
    assert load_options_from_args(p.parse_args([])) == LoadOptions()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits = (lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t)
    return a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def test_dummy_weights_are_deterministic():
    cfg = get_preset("tiny", moe_inter_dim=64, weight_format="fp8_fp4")
    model, again, other = (build_model(cfg, seed=s, load_format="dummy").state_dict() for s in (0, 0, 1))
    assert all(_same(v, again[k]) for k, v in model.items())
    for name in ("layers.1.ffn.experts.5.w2.weight", "layers.1.ffn.experts.5.w2.scale", "layers.0.attn.wq_b.weight",
                 "embed.weight"):
        assert not _same(model[name], other[name]), name


def test_bench_dims_dummy_activations_finite_and_order_one():
    """The bench preset's layer dims (2 layers, a smaller vocabulary to keep the CPU build short), quantized."""
    base = resolve_model_config("bench", None, LoadOptions(load_format="dummy", num_layers=2))
    cfg = ModelConfig(**{**base.model_dump(), "vocab_size": 4096})
    model = build_model(cfg, seed=0, load_format="dummy")
    logits, hidden = model.forward(prompt(9, seed=2), model.new_state(), return_hidden=True)
    rms = [h.float().pow(2).mean().sqrt().item() for h in hidden]
    assert torch.isfinite(logits).all() and all(0.3 < r < 3.0 for r in rms), rms
    assert 0.3 < logits.float().std().item() < 3.0
    assert weight_bytes(model) == planned_weight_bytes(cfg)
    assert weight_bytes(model)["fp4"] == 2 * 16 * 3 * 512 * 4096 // 2


def test_v4_flash_weights_are_the_published_size():
    """FP8 projections + FP4 experts at V4-Flash's dims: ~160 GB as published (the bf16 model: ~570 GB)."""
    quantized = planned_weight_bytes(resolve_model_config("v4-flash", None, LoadOptions(load_format="dummy")))
    plain = planned_weight_bytes(get_preset("v4-flash"))
    assert 150e9 < sum(quantized.values()) < 165e9, quantized
    assert 560e9 < sum(plain.values()) < 580e9, plain
    assert quantized["fp4"] == 43 * 256 * 3 * 2048 * 4096 // 2


def test_the_fingerprint_names_the_weight_options_and_needs_no_torch():
    """Workers with other weight options than the router's are refused: the router computes the same fingerprint
    from the same flags, without torch."""
    prints = {deployment_fingerprint("bench", None, 0, *flags)
              for flags in [(), ("dummy",), ("dummy", "bf16"), ("dummy", "auto", 2), ("auto", "fp32")]}
    assert len(prints) == 5
    assert deployment_fingerprint("bench", None, 0, "dummy", "auto", 2) == deployment_fingerprint(
        "bench", None, 0, **LoadOptions(load_format="dummy", num_layers=2).model_dump())
    code = ("import sys; from sparsepd.deploy.cli import build_parser; "
            "a = build_parser(['router']).parse_args(['router', '--load-format', 'dummy', '--num-layers', '2']); "
            "from sparsepd.fingerprint import deployment_fingerprint as f; "
            "print(f(a.preset, a.checkpoint, a.seed, a.load_format, a.dtype, a.num_layers)); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == deployment_fingerprint("tiny", None, 0, "dummy", "auto", 2)
