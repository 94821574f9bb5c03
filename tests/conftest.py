"""Test setup shared by the whole suite.

On a machine without a GPU the Triton kernels run in the interpreter, which Triton decides when a
kernel is decorated: the variable must be set before any kernel module is imported.

Every process a test starts inherits one cluster token (a random one per session, unless the environment
already has one), as a deployment's processes do: authentication is on throughout the suite.
"""

import os
import secrets

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("SPARSEPD_TEST_GPU") == "1" else "1")
os.environ.setdefault("SPARSEPD_CLUSTER_TOKEN", f"test-{secrets.token_urlsafe(24)}")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    """The device kernel tests run on: CUDA when SPARSEPD_TEST_GPU=1, else the CPU interpreter."""
    return torch.device("cuda" if os.environ.get("SPARSEPD_TEST_GPU") == "1" else "cpu")
