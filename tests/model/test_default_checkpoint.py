"""The shipped default model (`sparsepd/models/v4-byte-demo`, trained by tools/train_default_model.py): a
checkpoint in the published DeepSeek-V4 layout that loads through the published-layout loader, has every layer
kind and its MTP layer, and scores its held-out sample (Python standard library files it never trained on) at
the bits per byte its training run measured, so a broken loader, kernel or numerics change fails here."""

from __future__ import annotations

import json
import math
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from sparsepd.checkpoint_config import read_checkpoint_config, read_weight_format
from sparsepd.default_model import DEFAULT_CHECKPOINT, FALLBACK_PRESET, choose_model
from sparsepd.model.mtp import load_mtp
from sparsepd.model.request_cache import RequestCache
from sparsepd.model.state import RequestState
from sparsepd.model.tokenizer import HFTokenizer, load_tokenizer
from sparsepd.model.weights import build_model

ROOT = Path(__file__).resolve().parents[2]
PIECE = 256  # bytes a piece of the held-out sample (the training sequence length)
# The training run measured 2.273 bits/byte (MTP 2.198) on this sample (README "Default model"); the bounds
# leave room for float summation order across machines, not for a broken model (random weights: > 8).
MAX_BITS_PER_BYTE = 2.29
MAX_MTP_BITS_PER_BYTE = 2.22


@pytest.fixture(scope="module")
def cfg():
    return read_checkpoint_config(DEFAULT_CHECKPOINT)


@pytest.fixture(scope="module")
def model(cfg):
    return build_model(cfg, checkpoint=DEFAULT_CHECKPOINT)


def test_it_is_a_published_layout_v4_with_every_layer_kind(cfg):
    config = json.loads((DEFAULT_CHECKPOINT / "config.json").read_text())
    assert "sparsepd" not in config and config["model_type"] == "deepseek_v4"
    assert config["num_nextn_predict_layers"] == 1 and len(config["compress_ratios"]) == cfg.n_layers + 1
    assert {cfg.layer_kind(i) for i in range(cfg.n_layers)} == {"swa", "csa", "hca"}
    assert cfg.n_hash_layers >= 1 and cfg.n_routed_experts > cfg.n_activated_experts
    assert cfg.name == "v4-byte-demo" and cfg.weight_format == "plain" and not read_weight_format(
        DEFAULT_CHECKPOINT).quantized
    with safe_open(str(DEFAULT_CHECKPOINT / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert any(n.startswith("mtp.0.attn.") for n in names) and "mtp.0.e_proj.weight" in names
    total = sum(f.stat().st_size for f in DEFAULT_CHECKPOINT.iterdir())
    assert total <= 16 * 2**20, f"the shipped model takes {total} bytes, more than 16 MiB"


def test_its_tokenizer_is_the_byte_level_one(cfg):
    tok = load_tokenizer(cfg, DEFAULT_CHECKPOINT)
    assert isinstance(tok, HFTokenizer) and (tok.bos_id, tok.eos_id) == (256, 257)
    text = "def fibonacci(n):\n    return n  # é"
    assert tok.encode(text) == list(text.encode()) and tok.decode(list(text.encode())) == text


def bits_per_byte(model, mtp, data: bytes, piece: int = PIECE, device: str = "cpu") -> tuple[float, float]:
    """Mean bits per byte of the next byte and of the MTP layer's byte after it, piece by piece."""
    main = extra = 0.0
    pieces = [torch.tensor(list(data[i: i + piece]), device=device) for i in range(0, len(data), piece)]
    with torch.inference_mode():
        for ids in pieces:
            logits, hidden = model.forward(ids, model.new_state(), return_hidden=True)
            main += F.cross_entropy(logits[:-1], ids[1:]).item()
            following = ids[1:-1]
            y = mtp(hidden[-1][:-2], model.embed(following), following,
                    torch.arange(following.numel(), device=device), RequestCache(RequestState.fresh(mtp.cfg, device)))
            extra += F.cross_entropy(mtp.logits(y, model.head.weight), ids[2:]).item()
    return main / len(pieces) / math.log(2), extra / len(pieces) / math.log(2)


def test_heldout_bits_per_byte_is_what_training_measured(cfg, model):
    mtp = load_mtp(cfg, DEFAULT_CHECKPOINT)
    data = (DEFAULT_CHECKPOINT / "heldout_sample.txt").read_bytes()
    assert len(data) >= 8 * PIECE
    bits, mtp_bits = bits_per_byte(model, mtp, data)
    assert bits <= MAX_BITS_PER_BYTE, f"held-out {bits:.4f} bits/byte > {MAX_BITS_PER_BYTE}"
    assert mtp_bits <= MAX_MTP_BITS_PER_BYTE, f"MTP held-out {mtp_bits:.4f} bits/byte > {MAX_MTP_BITS_PER_BYTE}"


def test_a_wrong_weight_shows_in_bits_per_byte(cfg, model):
    """The bound can fail: the same model with one projection's weights swapped for another layer's scores far
    worse."""
    broken = build_model(cfg, checkpoint=DEFAULT_CHECKPOINT)
    with torch.no_grad():
        broken.layers[1].attn.wkv.weight.copy_(broken.layers[3].attn.wkv.weight.flip(0))
        broken.head.weight.copy_(broken.head.weight.roll(1, dims=0))
    mtp = load_mtp(cfg, DEFAULT_CHECKPOINT)
    data = (DEFAULT_CHECKPOINT / "heldout_sample.txt").read_bytes()[: 2 * PIECE]
    assert bits_per_byte(broken, mtp, data)[0] > MAX_BITS_PER_BYTE + 1.0


def test_serve_and_generate_default_to_it():
    assert choose_model(None, None) == (FALLBACK_PRESET, str(DEFAULT_CHECKPOINT))
    assert choose_model("tiny", None) == ("tiny", None)  # a preset: random weights, no checkpoint
    assert choose_model(None, "/some/dir") == (FALLBACK_PRESET, "/some/dir")
    assert choose_model("bench", "/some/dir") == ("bench", "/some/dir")


def test_pip_install_carries_its_files():
    """pyproject's package data names every shipped file (the wheel test in tests/sparsepd builds it for real)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["sparsepd"]
    package = ROOT / "sparsepd"
    for path in DEFAULT_CHECKPOINT.iterdir():
        rel = path.relative_to(package).as_posix()
        assert any(fnmatch(rel, p) for p in patterns), f"{rel} is not in package-data {patterns}"
