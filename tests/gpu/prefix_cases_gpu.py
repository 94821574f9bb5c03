"""What the prefix-cache tests on the GPU share: seeded prompts over the preset's vocabulary, and the comparison
of a restored request with a cold prefill in bf16 (chunked prefill rounds differently from one chunk):
log-probabilities to bf16 rounding, tokens where the reference's top two are apart by more than that, up to the
first token that differs (different tokens are fed from there)."""

from __future__ import annotations

import torch


def ids(n: int, seed: int, vocab_size: int) -> list[int]:
    return torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def chunking_spread(want, other) -> float:
    """How far two cold prefills of one prompt in different chunks apart differ: the largest log-probability
    difference up to the first token where they differ. In bf16 with FP8 KV rows a different chunking changes
    GEMM tiles and so, now and then, an FP8 row's rounding: this is the noise a restored prefix lives with too."""
    worst = 0.0
    for i, (x, y) in enumerate(zip(other.output_logprobs, want.output_logprobs, strict=True)):
        worst = max(worst, abs(x.logprob - y.logprob))
        if other.output_ids[: i + 1] != want.output_ids[: i + 1]:
            break
    return worst


def close_to_cold(got, want, spread: float = 0.0) -> None:
    """`got` within bf16 rounding of `want` (0.05 nats), or within twice what chunking alone moves the
    log-probabilities (`spread`, from chunking_spread) where that is more."""
    bound = max(0.05, 2 * spread)
    for i, (x, y) in enumerate(zip(got.output_logprobs, want.output_logprobs, strict=True)):
        assert abs(x.logprob - y.logprob) < bound, (i, x, y, bound)
        margin = y.top_logprobs[0] - y.top_logprobs[1]
        if margin > 0.1:
            assert got.output_ids[i] == want.output_ids[i], (i, margin)
        if got.output_ids[: i + 1] != want.output_ids[: i + 1]:
            break  # different tokens fed from here: nothing left to compare
