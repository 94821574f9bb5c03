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


def close_to_cold(got, want, spread: float | None = None) -> None:
    """`got` within bf16 rounding of `want`: 0.05 nats, tokens equal where the reference's top two are more than
    0.1 apart. With `spread` (chunking_spread's largest over several cold chunkings of the prompt), a restore
    from a boundary another request's chunk computed is a cold prefill under yet another chunking (its restored
    state equals a cold prefill's bit for bit: tests/engine/test_prefix_cache.py, bf16 with FP8 rows), and GEMM
    tiles, attention splits and FP8 row scales on the GPU move with the chunking in discrete jumps (an expert
    routing flip, a row scale): the bound is then max(0.1, 2 × spread), and tokens are compared where the
    margin exceeds twice it (each of the two log-probabilities may move by the bound)."""
    bound = 0.05 if spread is None else max(0.1, 2 * spread)
    for i, (x, y) in enumerate(zip(got.output_logprobs, want.output_logprobs, strict=True)):
        assert abs(x.logprob - y.logprob) < bound, (i, x, y, bound)
        margin = y.top_logprobs[0] - y.top_logprobs[1]
        if margin > (0.1 if spread is None else 2 * bound):
            assert got.output_ids[i] == want.output_ids[i], (i, margin)
        if got.output_ids[: i + 1] != want.output_ids[: i + 1]:
            break  # different tokens fed from here: nothing left to compare
