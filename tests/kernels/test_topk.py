"""kernels/topk.py: the Triton selection equals the PyTorch reference exactly, ties and padding included.

The selection is exact (no arithmetic on the scores), so the kernel must return the very same int32 rows as
the reference: same set, same order, ties broken by the lower position, −1 padding. On CPU the kernel runs
in the Triton interpreter at small shapes; with SPARSEPD_TEST_GPU=1 also at the indexer's real shapes.
"""

import os

import pytest
import torch

from sparsepd.kernels.topk import TopkConfig, topk_visible, topk_visible_ref

ON_GPU = os.environ.get("SPARSEPD_TEST_GPU") == "1"
POISON = -7


def make_scores(seed, T, E, ties=False, infs=False):
    """Continuous random scores; optionally many ties (8 distinct values in half the rows) and ±inf."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(T, E, generator=g) * torch.logspace(-3, 3, T)[:, None]
    if ties:
        s[::2] = torch.randint(-4, 4, (len(range(0, T, 2)), E), generator=g).float()
    if infs and E >= 4:
        s[0, E // 2] = float("inf")
        s[0, 1] = float("-inf")
        s[-1, : E // 3] = float("-inf")
    return s


def make_visible(seed, T, E, k):
    """Every visible regime: 0, 1, < k, = k, > k, = E, and past E (clamped)."""
    g = torch.Generator().manual_seed(seed + 1)
    special = [0, 1, max(0, k - 1), k, k + 1, E, E + 5]
    v = torch.randint(0, E + 1, (T,), generator=g)
    v[: min(T, len(special))] = torch.tensor(special[:T])
    return v.to(torch.int32)


def run_and_compare(seed, T, E, k, order, device, ties=False, infs=False, config=None):
    scores = make_scores(seed, T, E, ties, infs)
    visible = make_visible(seed, T, E, k)
    ref = topk_visible_ref(scores, visible, k, order=order)
    out = torch.full((T, k), POISON, dtype=torch.int32, device=device)
    res = topk_visible(scores.to(device), visible.to(device), k, order=order, out=out, backend="triton",
                       config=config)
    assert res is out
    got = res.cpu()
    bad = (got != ref).nonzero()
    assert bad.numel() == 0, (
        f"seed={seed} T={T} E={E} k={k} order={order} ties={ties}: {bad.shape[0]} mismatches, first [t, j] "
        f"{bad[:5].tolist()}; got {got[bad[0, 0]].tolist()[:12]} want {ref[bad[0, 0]].tolist()[:12]} "
        f"(visible {int(visible[bad[0, 0]])})")
    return ref, visible


@pytest.mark.parametrize("order", ["score", "position"])
@pytest.mark.parametrize("T, E, k", [(7, 1, 1), (9, 100, 16), (8, 300, 7), (7, 64, 100), (8, 2**10 + 17, 33)])
def test_matches_reference(T, E, k, order, device):
    run_and_compare(T * 1000 + E + k, T, E, k, order, device)


@pytest.mark.parametrize("config", [TopkConfig(keys_per_thread=1), TopkConfig(keys_per_thread=64)])
def test_launch_variants(config, device):
    """Many warps (one key a thread) or few: the same exact result."""
    for seed, ties in ((21, False), (22, True)):
        run_and_compare(seed, 8, 700, 50, "position", device, ties=ties, config=config)


RADIX = TopkConfig(keys_per_thread=32, radix=True)


@pytest.mark.parametrize("order", ["score", "position"])
@pytest.mark.parametrize("T, E, k", [(7, 1, 1), (9, 100, 16), (8, 300, 7), (7, 64, 100), (8, 2**10 + 17, 33)])
def test_radix_select_matches_reference(T, E, k, order, device):
    """The radix-select threshold: the same exact result, with ties (a split group), ±inf and every visible count."""
    run_and_compare(T * 1000 + E + k, T, E, k, order, device, config=RADIX)
    run_and_compare(T * 1000 + E + k + 1, T, E, k, order, device, ties=True, infs=True, config=RADIX)


@pytest.mark.parametrize("order", ["score", "position"])
def test_radix_select_over_candidate_rounds(order, device):
    run_and_compare(4, 3, 2 * 16384 + 5, 24, order, device, ties=True, config=RADIX)


@pytest.mark.parametrize("order", ["score", "position"])
def test_ties_break_by_lower_position(order, device):
    ref, visible = run_and_compare(11, 8, 500, 40, order, device, ties=True)
    # the reference itself: among equal scores the lower positions are taken
    scores = make_scores(11, 8, 500, ties=True)
    n = int(visible[4])
    row = ref[4][ref[4] >= 0].long()
    kth = scores[4, row].min()
    taken = set(row.tolist())
    assert all(p in taken for p in range(n) if scores[4, p] > kth)
    equal = [p for p in range(n) if scores[4, p] == kth]
    taken_equal = [p for p in equal if p in taken]
    assert len(equal) > len(taken_equal) > 0, "the case must split a group of ties"
    assert taken_equal == equal[: len(taken_equal)]


@pytest.mark.parametrize("order", ["score", "position"])
def test_infinities(order, device):
    run_and_compare(5, 7, 257, 20, order, device, infs=True)


@pytest.mark.parametrize("order", ["score", "position"])
def test_rows_longer_than_a_segment(order, device):
    """E > 16384 takes the candidate rounds (each segment keeps k, then one program merges)."""
    run_and_compare(3, 4, 3 * 16384 + 17, 24, order, device, ties=True)


def test_writes_stay_inside_out(device):
    """The threshold's group of ties comes last in the row: nothing is written past out's k slots."""
    k, E = 12, 40
    scores = torch.arange(E, 0, -1, dtype=torch.float32)[None, :]  # strictly decreasing ...
    scores[0, 8:] = 0.5  # ... then 32 ties, of which 4 are taken
    buf = torch.full((k + 16,), POISON, dtype=torch.int32, device=device)
    out = topk_visible(scores.to(device), torch.tensor([E], dtype=torch.int32, device=device), k,
                       order="position", out=buf[:k].view(1, k), backend="triton")
    assert out.tolist() == [list(range(k))]
    assert (buf[k:] == POISON).all(), f"written past out: {buf[k:].tolist()}"


def test_position_order_is_the_same_set(device):
    scores = make_scores(2, 8, 400).to(device)
    visible = make_visible(2, 8, 400, 50).to(device)
    a = topk_visible(scores, visible, 50, order="score", backend="triton").cpu()
    b = topk_visible(scores, visible, 50, order="position", backend="triton").cpu()
    for ra, rb in zip(a, b, strict=True):
        va, vb = ra[ra >= 0], rb[rb >= 0]
        assert torch.equal(va.sort().values, vb), f"different sets: {va.tolist()} vs {vb.tolist()}"
        assert torch.equal(vb, vb.sort().values)


def test_reference_is_batch_invariant():
    """A row's result depends on its own scores and visible count only (the CPU model relies on it)."""
    scores, visible = make_scores(4, 6, 90), make_visible(4, 6, 90, 10)
    whole = topk_visible_ref(scores, visible, 10)
    for t in range(6):
        wider = torch.cat([scores[t:t + 1], torch.randn(1, 30)], dim=1)  # more entries past visible
        alone = topk_visible_ref(wider, visible[t:t + 1], 10)
        assert torch.equal(alone[0], whole[t])


def test_bad_inputs_raise():
    s, v = torch.randn(3, 10), torch.full((3,), 10, dtype=torch.int32)
    with pytest.raises(ValueError, match="k must be"):
        topk_visible(s, v, 0)
    with pytest.raises(TypeError, match="visible must be int32"):
        topk_visible(s, v.long(), 4)
    with pytest.raises(ValueError, match="order"):
        topk_visible(s, v, 4, order="random")
    with pytest.raises(ValueError, match="out must be int32"):
        topk_visible(s, v, 4, out=torch.empty(3, 5, dtype=torch.int32))
    with pytest.raises(TypeError, match="scores must be float32"):
        topk_visible(s.half(), v, 4)


@pytest.mark.skipif(not ON_GPU, reason="real shapes on the GPU")
@pytest.mark.parametrize("order", ["score", "position"])
@pytest.mark.parametrize("T, E, k", [(64, 8192, 512), (32, 8192, 2048), (16, 32768, 1024), (4, 131072, 2048),
                                     (256, 2048, 2048)])
def test_real_shapes(T, E, k, order, device):
    run_and_compare(T + E + k, T, E, k, order, device, ties=E <= 8192)
    run_and_compare(T + E + k, T, E, k, order, device, ties=E <= 8192, config=RADIX)
