"""tools/train_default_model.py, the script that trained the shipped default model, at a tiny size for a few
steps: its loss falls, and what it writes is a published-layout checkpoint with an MTP layer that the loader
reads back and that scores its own held-out sample as the script reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_default_checkpoint import bits_per_byte

from sparsepd.checkpoint_config import read_checkpoint_config
from sparsepd.model.mtp import load_mtp
from sparsepd.model.weights import build_model

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "train_default_model.py"
SEQ = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "tiny-trained"
    run = subprocess.run([sys.executable, str(SCRIPT), "--size", "test", "--steps", "12", "--batch", "1",
                          "--seq-len", str(SEQ), "--lr", "1e-2", "--warmup", "2", "--eval-every", "6",
                          "--eval-windows", "2", "--sample-pieces", "2", "--seed", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "held-out sample" in run.stdout and "greedy 'def fibonacci('" in run.stdout
    return out


def test_the_loss_falls(trained):
    report = json.loads((trained / "training.json").read_text())
    curve = report["curve"]
    assert [c["step"] for c in curve] == [1, 6, 12] and report["steps_run"] == 12
    first, last = curve[0], curve[-1]
    assert last["heldout_bits_per_byte"] < first["heldout_bits_per_byte"] - 1.0, curve
    assert last["heldout_mtp_bits_per_byte"] < first["heldout_mtp_bits_per_byte"] - 1.0, curve


def test_it_writes_a_checkpoint_the_loader_reads(trained):
    cfg = read_checkpoint_config(trained)
    assert cfg.name == "tiny-trained" and {cfg.layer_kind(i) for i in range(cfg.n_layers)} == {"swa", "csa", "hca"}
    model = build_model(cfg, checkpoint=trained)
    mtp = load_mtp(cfg, trained)
    report = json.loads((trained / "training.json").read_text())
    bits, mtp_bits = bits_per_byte(model, mtp, (trained / "heldout_sample.txt").read_bytes(), SEQ)
    assert abs(bits - report["sample_bits_per_byte"]) < 1e-3
    assert abs(mtp_bits - report["sample_mtp_bits_per_byte"]) < 1e-3
    assert bits < 8.0  # better than a uniform guess over the bytes
