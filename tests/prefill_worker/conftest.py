"""The tiny model the prefill worker's tests run (built once per session)."""

from __future__ import annotations

import pytest

from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset


@pytest.fixture(scope="session")
def tiny():
    return build_model(get_preset("tiny"), seed=0)
