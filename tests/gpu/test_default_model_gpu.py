"""The shipped default model on the GPU (run with SPARSEPD_TEST_GPU=1): loaded onto the device, scored through the
Triton kernels, its held-out bits per byte is the CPU reference's (fp32 weights, FP8 KV rows on both)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from test_default_checkpoint import MAX_BITS_PER_BYTE, bits_per_byte  # noqa: E402

from sparsepd.checkpoint_config import read_checkpoint_config  # noqa: E402
from sparsepd.default_model import DEFAULT_CHECKPOINT  # noqa: E402
from sparsepd.model.mtp import load_mtp  # noqa: E402
from sparsepd.model.weights import build_model  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("SPARSEPD_TEST_GPU") != "1" or not torch.cuda.is_available(),
                                reason="needs a CUDA device and SPARSEPD_TEST_GPU=1")


def test_heldout_bits_per_byte_on_the_gpu_match_the_cpu():
    cfg = read_checkpoint_config(DEFAULT_CHECKPOINT)
    data = (DEFAULT_CHECKPOINT / "heldout_sample.txt").read_bytes()
    cpu = bits_per_byte(build_model(cfg, checkpoint=DEFAULT_CHECKPOINT), load_mtp(cfg, DEFAULT_CHECKPOINT), data)
    gpu_model = build_model(cfg, checkpoint=DEFAULT_CHECKPOINT, device="cuda")
    gpu_mtp = load_mtp(cfg, DEFAULT_CHECKPOINT).to("cuda")
    gpu = bits_per_byte(gpu_model, gpu_mtp, data, device="cuda")
    assert gpu[0] <= MAX_BITS_PER_BYTE + 0.02, gpu
    assert abs(gpu[0] - cpu[0]) < 0.02 and abs(gpu[1] - cpu[1]) < 0.02, (cpu, gpu)
