"""Checkpoints: save → load gives identical logits; bad checkpoints are refused by name; FP8/FP4 dequant;
random init keeps activations finite and O(1) through every layer."""

from __future__ import annotations

import pytest
import torch
from helpers import prompt, tiny_model
from safetensors.torch import load_file, save_file

from sparsepd.model.transformer import Transformer
from sparsepd.model.weights import CheckpointError, build_model, load_checkpoint, read_config, save_checkpoint
from sparsepd.model_config import get_preset


def test_save_load_round_trip(tmp_path):
    model = tiny_model(seed=4)
    save_checkpoint(model, tmp_path)
    assert read_config(tmp_path) == model.cfg
    loaded = build_model(read_config(tmp_path), checkpoint=tmp_path)
    ids = prompt(45, seed=1)
    assert torch.equal(model.prefill(ids)[0], loaded.prefill(ids)[0])


def test_official_names(tmp_path):
    names = set(tiny_model().state_dict())
    for expected in ["embed.weight", "head.weight", "norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale",
                     "layers.0.attn.wq_a.weight", "layers.0.attn.q_norm.weight", "layers.0.attn.wkv.weight",
                     "layers.0.attn.kv_norm.weight", "layers.0.attn.wo_a.weight", "layers.0.attn.wo_b.weight",
                     "layers.0.attn.attn_sink", "layers.1.attn.compressor.ape", "layers.1.attn.compressor.wkv.weight",
                     "layers.1.attn.compressor.wgate.weight", "layers.1.attn.compressor.norm.weight",
                     "layers.1.attn.indexer.wq_b.weight", "layers.1.attn.indexer.weights_proj.weight",
                     "layers.1.attn.indexer.compressor.ape", "layers.0.ffn.gate.tid2eid", "layers.1.ffn.gate.bias",
                     "layers.1.ffn.experts.7.w3.weight", "layers.0.ffn.shared_experts.w2.weight",
                     "layers.0.attn_norm.weight", "layers.0.ffn_norm.weight", "layers.0.hc_attn_fn",
                     "layers.0.hc_ffn_scale"]:
        assert expected in names, expected
    assert "layers.0.ffn.gate.bias" not in names and "layers.2.attn.indexer.wq_b.weight" not in names


def _rewrite(directory, edit):
    tensors = load_file(str(directory / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"))


@pytest.mark.parametrize("case", ["missing", "shape", "extra"])
def test_bad_checkpoint_refused_with_the_name(tmp_path, case):
    save_checkpoint(tiny_model(), tmp_path)
    name = "layers.2.attn.compressor.wkv.weight"

    def edit(t):
        if case == "missing":
            del t[name]
        elif case == "shape":
            t[name] = t[name][:, :-1].contiguous()
        else:
            t["layers.9.attn.surprise.weight"] = torch.zeros(2)

    _rewrite(tmp_path, edit)
    want = "layers.9.attn.surprise.weight" if case == "extra" else name
    with pytest.raises(CheckpointError, match=want.replace(".", r"\.")):
        load_checkpoint(Transformer(get_preset("tiny")), tmp_path)


def test_fp8_block_scaled_weight_is_dequantized(tmp_path):
    model = tiny_model(seed=5)
    save_checkpoint(model, tmp_path)
    name = "layers.0.attn.wq_b.weight"  # [384, 48]: blocks of 128×128 with a partial last block
    w = model.state_dict()[name].float()
    gen = torch.Generator().manual_seed(0)
    scale = torch.exp2(torch.randint(-8, -3, (3, 1), generator=gen).float())  # ue8m0-style power-of-two scales
    fp8 = (w / scale.repeat_interleave(128, 0)[: w.shape[0]]).to(torch.float8_e4m3fn)
    expected = fp8.float() * scale.repeat_interleave(128, 0)[: w.shape[0]]

    def edit(t):
        t[name] = fp8
        t[name[: -len("weight")] + "scale"] = scale

    _rewrite(tmp_path, edit)
    loaded = load_checkpoint(Transformer(get_preset("tiny")), tmp_path)
    assert torch.equal(loaded.state_dict()[name], expected)


def test_fp4_expert_weight_is_dequantized(tmp_path):
    save_checkpoint(tiny_model(seed=5), tmp_path)
    name = "layers.1.ffn.experts.3.w1.weight"  # [48, 64]: 32 bytes per row, one scale per 32 values
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (48, 64), generator=gen)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    scale = torch.exp2(torch.randint(-4, 2, (48, 2), generator=gen).float())
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    values = torch.where(codes >= 8, -grid[codes % 8], grid[codes % 8])
    expected = values * scale.repeat_interleave(32, 1)

    def edit(t):
        t[name] = packed
        t[name[: -len("weight")] + "scale"] = scale

    _rewrite(tmp_path, edit)
    loaded = load_checkpoint(Transformer(get_preset("tiny")), tmp_path)
    assert torch.equal(loaded.state_dict()[name], expected)


def test_init_is_deterministic():
    a, b, c = tiny_model(seed=7), tiny_model(seed=7), tiny_model(seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["layers.0.attn.wkv.weight"], sc["layers.0.attn.wkv.weight"])


def _activation_rms(model, length: int) -> list[float]:
    _, hidden = model.forward(prompt(length, seed=2), model.new_state(), return_hidden=True)
    return [h.float().pow(2).mean().sqrt().item() for h in hidden]


def test_tiny_activations_finite_and_order_one():
    model = tiny_model(seed=0)
    logits, hidden = model.forward(prompt(120, seed=2), model.new_state(), return_hidden=True)
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(h).all() for h in hidden)
    rms = _activation_rms(model, 120)
    assert all(0.3 < r < 3.0 for r in rms), rms
    assert 0.3 < logits.std().item() < 3.0


def test_bench_activations_finite_and_order_one():
    """One short forward of the real-dims preset on the CPU (bf16)."""
    model = build_model(get_preset("bench"), seed=0)
    logits, hidden = model.forward(prompt(9, seed=2), model.new_state(), return_hidden=True)
    assert torch.isfinite(logits).all()
    rms = [h.float().pow(2).mean().sqrt().item() for h in hidden]
    assert all(0.3 < r < 3.0 for r in rms), rms
    assert 0.3 < logits.float().std().item() < 3.0
