"""What the prefix-cache tests on the CPU share: seeded prompts, a request run to its length, and the comparison
of a restored request with a cold prefill (the same tokens; log-probabilities equal up to fp32 reordering)."""

from __future__ import annotations

import pytest
import torch

from sparsepd.engine.engine import Engine
from sparsepd.engine.sampling import SamplingParams


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_to_length(engine: Engine, prompt: list[int], params: SamplingParams):
    request = engine.submit(prompt, params)
    engine.scheduler.run_to_completion()
    assert request.finish_reason == "length"
    return request


def same_as_cold(a, b) -> None:
    assert a.output_ids == b.output_ids
    for x, y in zip(a.output_logprobs, b.output_logprobs, strict=True):
        assert x.top_ids == y.top_ids
        assert x.logprob == pytest.approx(y.logprob, rel=1e-4, abs=1e-5)
        assert list(x.top_logprobs) == pytest.approx(list(y.top_logprobs), rel=1e-4, abs=1e-5)
