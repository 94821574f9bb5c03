"""The default model's FP8/FP4 copy (tools/quantize_checkpoint.py, model/quantize.py): written in the published
layout, served with its weights kept quantized (FP8 projections, packed FP4 experts), and within a small
distance of the full-precision model in held-out bits per byte. The quantizer's formats are checked against
their definitions, and a bad source is refused with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_default_checkpoint import PIECE, bits_per_byte

from sparsepd.checkpoint_config import read_checkpoint_config
from sparsepd.default_model import DEFAULT_CHECKPOINT
from sparsepd.load_options import resolve_model_config
from sparsepd.model.linear import Fp8Linear
from sparsepd.model.moe import Fp4Experts
from sparsepd.model.mtp import load_mtp
from sparsepd.model.quantize import E2M1_VALUES, quantize_fp4_groups, quantize_fp8_tiles
from sparsepd.model.weights import build_model

TOOL = Path(__file__).resolve().parents[2] / "tools" / "quantize_checkpoint.py"
PIECES = 3  # of the 16 in the shipped sample: the quantized path on the CPU takes ~4 s a piece
# FP8 e4m3 projections and FP4 e2m1 experts cost the shipped model 0.009 bits/byte over the whole sample
# (2.282 vs 2.273); the bound allows the per-piece noise of 3 pieces, and a wrong scale or nibble order costs
# far more (a scale off by one power of two in every tile: +0.3 or worse).
MAX_EXTRA_BITS = 0.05


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "v4-byte-demo-fp8"
    run = subprocess.run([sys.executable, str(TOOL), str(DEFAULT_CHECKPOINT), str(out)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "FP8 projections, FP4 experts" in run.stdout
    return out


def test_the_copy_is_kept_quantized_when_loaded(copy):
    cfg = resolve_model_config(None, str(copy))
    assert (cfg.weight_format, cfg.dtype) == ("fp8_fp4", "bfloat16")
    model = build_model(cfg, checkpoint=copy)
    fp8 = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert fp8 and all(m.weight.dtype == torch.float8_e4m3fn for m in fp8)
    assert any(isinstance(m, Fp4Experts) for m in model.modules())
    assert sum(f.stat().st_size for f in copy.glob("*.safetensors")) < 0.5 * (DEFAULT_CHECKPOINT /
                                                                             "model.safetensors").stat().st_size


def test_the_copy_scores_close_to_the_full_precision_model(copy):
    data = (DEFAULT_CHECKPOINT / "heldout_sample.txt").read_bytes()[: PIECES * PIECE]
    plain_cfg = read_checkpoint_config(DEFAULT_CHECKPOINT)
    full = bits_per_byte(build_model(plain_cfg, checkpoint=DEFAULT_CHECKPOINT),
                         load_mtp(plain_cfg, DEFAULT_CHECKPOINT), data)
    cfg = resolve_model_config(None, str(copy))
    quant = bits_per_byte(build_model(cfg, checkpoint=copy),
                          load_mtp(cfg.model_copy(update={"weight_format": "plain"}), copy), data)
    assert quant[0] - full[0] < MAX_EXTRA_BITS, (full, quant)
    assert quant[1] - full[1] < MAX_EXTRA_BITS, (full, quant)


def test_fp8_tiles_follow_the_format():
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(1)) * 3
    w[:128, :128] = 0.0  # an all-zero tile
    q, scale = quantize_fp8_tiles(w)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float8_e8m0fnu and scale.shape == (2, 3)
    s = scale.float()
    assert torch.equal(s, torch.exp2(torch.log2(s).round()))  # powers of two
    full = s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    deq = q.float() * full
    assert deq[:128, :128].abs().max() == 0
    assert (q.float().abs().amax() <= 448) and (q.float().abs() > 224).any()  # the scale uses the top binade
    rel = ((deq - w).abs() / w.abs().clamp(min=1e-3))[w.abs() > full * 2.0**-6]
    assert rel.max() <= 2.0**-4  # e4m3: 3 mantissa bits, rounding to nearest


def test_fp4_groups_follow_the_format():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    packed, scale = quantize_fp4_groups(w)
    assert packed.dtype == torch.int8 and packed.shape == (4, 32) and scale.shape == (4, 2)
    b = packed.view(torch.uint8).long()
    code = torch.stack([b & 15, b >> 4], -1).flatten(-2)  # even column in the low nibble
    values = torch.tensor(E2M1_VALUES)[code & 7] * torch.where(code >= 8, -1.0, 1.0)
    deq = values * scale.float().repeat_interleave(32, 1)
    grid = torch.tensor(E2M1_VALUES) * scale.float().repeat_interleave(32, 1)[..., None]
    nearest = (w.abs()[..., None] - grid).abs().min(-1).values  # no representable value is closer
    assert torch.allclose((deq - w).abs(), nearest, atol=1e-6)
    assert (deq.abs().unflatten(1, (-1, 32)).amax(-1) > 0).all()


def test_a_bad_source_or_destination_is_refused(copy, tmp_path):
    again = subprocess.run([sys.executable, str(TOOL), str(copy), str(tmp_path / "twice")], capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 2 and "quantized already" in again.stderr
    busy = subprocess.run([sys.executable, str(TOOL), str(DEFAULT_CHECKPOINT), str(copy)], capture_output=True,
                          text=True, timeout=120)
    assert busy.returncode == 2 and "holds a checkpoint already" in busy.stderr
    assert json.loads((copy / "config.json").read_text())["expert_dtype"] == "fp4"
