"""What the prefix-cache tests on the GPU share: seeded prompts over the preset's vocabulary, and the comparison
of a restored request with a cold prefill in bf16 (chunked prefill rounds differently from one chunk):
log-probabilities to bf16 rounding, tokens where the reference's top two are apart by more than that, up to the
first token that differs (different tokens are fed from there)."""

from __future__ import annotations

import torch


def ids(n: int, seed: int, vocab_size: int) -> list[int]:
    return torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def close_to_cold(got, want) -> None:
    for i, (x, y) in enumerate(zip(got.output_logprobs, want.output_logprobs, strict=True)):
        assert abs(x.logprob - y.logprob) < 0.05, (i, x, y)
        margin = y.top_logprobs[0] - y.top_logprobs[1]
        if margin > 0.1:
            assert got.output_ids[i] == want.output_ids[i], (i, margin)
        if got.output_ids[: i + 1] != want.output_ids[: i + 1]:
            break  # different tokens fed from here: nothing left to compare
