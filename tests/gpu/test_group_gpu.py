"""Worker groups over NCCL (engine/group.py, model/expert_parallel.py), rank r on cuda:r, the `tiny` preset in
fp32: a group of one (collectives of one rank, the engine with CUDA graphs) gives the plain model's logits bit
for bit and its greedy tokens; with two GPUs, a group of two against the single-process reference within the
bound tests/engine/test_group.py states."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
from test_group import check_group, run_group  # noqa: E402

GPU = os.environ.get("SPARSEPD_TEST_GPU") == "1" and torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not GPU, reason="needs a CUDA device and SPARSEPD_TEST_GPU=1")


@pytest.mark.parametrize("world", [1, 2])
def test_nccl_group_matches_single_process(world, tmp_path):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs, found {torch.cuda.device_count()}")
    check_group(run_group(world, tmp_path, "--cuda"), world)
