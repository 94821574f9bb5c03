"""Sampled rows under speculation keep the model's distribution: a chi-square test of the joint distribution of
three sampled tokens (top-2 each: 8 cells) over many seeds, with a draft for the second token that the model
accepts about a third of the time, against the exact probabilities of the reference model."""

from __future__ import annotations

import pytest
import torch

from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset

PROMPT = [17, 99, 3, 250, 41, 41, 7, 180, 66, 12, 5]
TEMPERATURE, TOP_K, NUM_SEEDS = 1.0, 2, 1200
CHI2_P001_7DOF = 24.32  # the chi-square quantile at p = 0.001 with 7 degrees of freedom


@pytest.fixture(scope="module")
def tiny():
    return build_model(get_preset("tiny"), seed=0)


def _top2(logits: torch.Tensor) -> dict[int, float]:
    """The sampler's distribution with top_k = 2: softmax(logits / T) on the two best, renormalized."""
    probs = torch.softmax(logits.double() / TEMPERATURE, dim=-1)
    top = torch.topk(probs, TOP_K)
    return {int(i): float(p / top.values.sum()) for i, p in zip(top.indices, top.values, strict=True)}


def _exact_joint(model) -> tuple[dict[tuple[int, int, int], float], dict[int, int]]:
    """P(t1, t2, t3) of the reference forward; the draft for t2 after each t1 (the less likely of its two)."""
    joint, drafts = {}, {}
    logits, state = model.prefill(torch.tensor(PROMPT))
    for t1, p1 in _top2(logits[-1]).items():
        s1 = state.clone()
        dist2 = _top2(model.decode(t1, s1))
        drafts[t1] = min(dist2, key=dist2.get)
        for t2, p2 in dist2.items():
            s2 = s1.clone()
            for t3, p3 in _top2(model.decode(t2, s2)).items():
                joint[(t1, t2, t3)] = p1 * p2 * p3
    return joint, drafts


class SecondTokenDrafter:
    """Drafts one token, for the second output: a fixed choice given the first."""

    def __init__(self, drafts: dict[int, int]):
        self.drafts = drafts

    def draft(self, spans, hidden, k):
        return {s.request: [self.drafts[s.request.output_ids[0]]] for s in spans
                if s.propose and len(s.request.output_ids) == 1}


def test_sampled_rows_keep_the_target_distribution(tiny):
    joint, drafts = _exact_joint(tiny)
    engine = Engine(tiny, PoolConfig(num_slots=64, max_batch_tokens=1024, num_pages=256), speculative_num_steps=1,
                    drafter=SecondTokenDrafter(drafts))
    params = [SamplingParams(temperature=TEMPERATURE, top_k=TOP_K, max_new_tokens=3, ignore_eos=True, seed=s)
              for s in range(NUM_SEEDS)]
    requests = engine.generate([PROMPT] * NUM_SEEDS, params)
    assert engine.is_idle_and_empty()
    counts = {cell: 0 for cell in joint}
    for r in requests:
        counts[tuple(r.output_ids)] += 1  # KeyError: a token outside the top-2 support
    chi2 = sum((counts[c] - NUM_SEEDS * p) ** 2 / (NUM_SEEDS * p) for c, p in joint.items())
    assert chi2 < CHI2_P001_7DOF, f"chi-square {chi2:.1f} over {NUM_SEEDS} seeds: counts {counts}, exact {joint}"
    stats = engine.scheduler.stats
    assert stats.drafted == NUM_SEEDS  # one draft per request, for its second token
    # The draft is accepted with probability p(d | t1): its expectation over t1, within 5 standard deviations.
    p1 = {t1: sum(p for (a, _, _), p in joint.items() if a == t1) for t1 in drafts}
    accept = sum(p1[t1] * sum(p for (a, b, _), p in joint.items() if a == t1 and b == d) / p1[t1]
                 for t1, d in drafts.items())
    sd = (accept * (1 - accept) / NUM_SEEDS) ** 0.5
    assert abs(stats.accepted / stats.drafted - accept) < 5 * sd + 1e-9, (stats, accept)
