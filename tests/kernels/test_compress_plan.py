"""Compress and write plans (kernels/compress_plan.py): hand-checked cases and the brute-force builder."""

import random

import pytest
import torch

from sparsepd.kernels.compress_plan import (
    build_compress_plan,
    build_compress_plan_ref,
    build_write_plan,
    build_write_plan_ref,
)


def rows(plan) -> list[list[int]]:
    return plan.rows[: plan.num_rows].tolist()


def ring_rows(start, n, size, ragged0=0, b=0):
    keep = range(max(0, n - size), n)
    return [[ragged0 + k, b, start + k, (start + k) % size] for k in keep]


def test_fresh_prefill_overlap():
    plan = build_compress_plan([0], [10], 4, True)
    # commits at p = 3 and 7; windows −4…3 (padding then input) and 0…7 (input only): nothing from the ring
    assert rows(plan.commit) == [[3, 0, 3, 0], [7, 0, 7, 0]]
    assert plan.commit.cu_host.tolist() == [0, 2]
    assert plan.state_size == 8
    assert rows(plan.write) == ring_rows(0, 10, 8)  # positions 2…9
    assert plan.write.cu_host.tolist() == [0, 8]


def test_chunked_prefill_ending_mid_block():
    plan = build_compress_plan([6], [7], 4, True)  # positions 6…12
    # p = 7: window 0…7, positions 0…5 from the ring; p = 11: window 4…11, positions 4, 5 from the ring
    assert rows(plan.commit) == [[1, 0, 7, 6], [5, 0, 11, 2]]
    assert rows(plan.write) == ring_rows(6, 7, 8)  # fewer new tokens than the ring: all of them


def test_single_decode_without_commit():
    plan = build_compress_plan([9], [1], 4, True)
    assert plan.commit.num_rows == 0 and plan.commit.rows.shape == (0, 4)
    assert rows(plan.write) == [[0, 0, 9, 1]]


def test_decode_that_commits():
    plan = build_compress_plan([11], [1], 4, True)
    assert rows(plan.commit) == [[0, 0, 11, 7]]  # window 4…11: seven positions from the ring
    plan = build_compress_plan([255], [1], 128, False)
    assert rows(plan.commit) == [[0, 0, 255, 127]]


def test_window_reaching_below_zero_after_a_chunk():
    plan = build_compress_plan([2], [2], 4, True)  # p = 3: window −4…3, ring holds 0, 1
    assert rows(plan.commit) == [[1, 0, 3, 2]]


def test_hca_without_commit():
    plan = build_compress_plan([0], [100], 128, False)
    assert plan.commit.num_rows == 0
    assert rows(plan.write) == ring_rows(0, 100, 128)
    assert plan.state_size == 128


def test_empty_batch():
    plan = build_compress_plan([], [], 4, True)
    assert plan.commit.rows.shape == (0, 4) and plan.write.rows.shape == (0, 4)
    assert plan.commit.cu_host.tolist() == [0] and plan.write.cu_host.tolist() == [0]
    padded = build_compress_plan([], [], 4, True, capacity=3, write_capacity=2)
    assert padded.commit.rows.tolist() == [[-1] * 4] * 3
    assert padded.write.rows.tolist() == [[-1] * 4] * 2


def test_mixed_batch_offsets_and_prefix_sums():
    plan = build_compress_plan([0, 15, 2], [5, 1, 0], 4, False)  # prefill, committing decode, empty request
    assert rows(plan.commit) == [[3, 0, 3, 0], [5, 1, 15, 3]]
    assert plan.commit.cu_host.tolist() == [0, 1, 2, 2]
    assert rows(plan.write) == ring_rows(0, 5, 4) + [[5, 1, 15, 3]]
    assert plan.write.cu_host.tolist() == [0, 4, 5, 5]
    assert plan.commit.rows.dtype == torch.int32 and plan.commit.cu.dtype == torch.int32


def test_swa_write_plan():
    plan = build_write_plan([120, 0], [20, 3], 16)
    assert rows(plan) == ring_rows(120, 20, 16) + ring_rows(0, 3, 16, ragged0=20, b=1)


def test_fixed_capacity_decode_plan():
    starts = [3, 4, 7, 11]
    plan = build_compress_plan(starts, [1] * 4, 4, True, capacity=4, write_capacity=4)
    assert plan.commit.rows.tolist() == [[0, 0, 3, 3], [2, 2, 7, 7], [3, 3, 11, 7], [-1] * 4]
    assert plan.commit.num_rows == 3
    assert plan.write.rows.shape == (4, 4) and plan.write.num_rows == 4
    with pytest.raises(ValueError, match="capacity"):
        build_compress_plan(starts, [1] * 4, 4, True, capacity=2)


def test_device_copies_match_host():
    plan = build_compress_plan([0, 5], [9, 4], 4, True, device="cpu")
    assert torch.equal(plan.commit.cu, plan.commit.cu_host)
    assert torch.equal(plan.write.cu, plan.write.cu_host)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="one entry a request"):
        build_compress_plan([0, 1], [3], 4, True)
    with pytest.raises(ValueError, match="≥ 0"):
        build_compress_plan([-1], [3], 4, True)
    with pytest.raises(ValueError, match="ratio"):
        build_compress_plan([0], [3], 0, True)
    with pytest.raises(ValueError, match="integers"):
        build_compress_plan(torch.tensor([0.5]), [3], 4, True)
    with pytest.raises(ValueError, match="size"):
        build_write_plan([0], [3], 0)


@pytest.mark.parametrize("seed", range(30))
def test_vectorized_equals_brute_force(seed):
    rng = random.Random(seed)
    ratio, overlap = rng.choice([(4, True), (4, False), (128, False), (3, True), (1, False)])
    B = rng.randint(1, 6)
    starts = [rng.choice([0, rng.randint(0, 600)]) for _ in range(B)]
    num_new = [rng.choice([0, 1, rng.randint(1, 300)]) for _ in range(B)]
    cap = rng.choice([None, 400])
    got = build_compress_plan(starts, num_new, ratio, overlap, capacity=cap, write_capacity=cap)
    want = build_compress_plan_ref(starts, num_new, ratio, overlap, capacity=cap, write_capacity=cap)
    ctx = f"seed={seed} ratio={ratio} overlap={overlap} starts={starts} num_new={num_new}"
    for a, b in ((got.commit, want.commit), (got.write, want.write)):
        assert a.num_rows == b.num_rows, ctx
        assert torch.equal(a.rows, b.rows), ctx
        assert torch.equal(a.cu_host, b.cu_host), ctx
    size = rng.choice([1, 16, 128])
    assert torch.equal(build_write_plan(starts, num_new, size).rows, build_write_plan_ref(starts, num_new, size).rows)


@pytest.mark.parametrize("seed", range(5))
def test_plan_rows_follow_the_definition(seed):
    """Every committed entry appears once, in order, with its window's ring count; the write plan holds each
    request's last state_size positions on distinct ring rows."""
    rng = random.Random(100 + seed)
    ratio, overlap = rng.choice([(4, True), (16, False)])
    W = (2 if overlap else 1) * ratio
    starts = [rng.randint(0, 80) for _ in range(4)]
    num_new = [rng.randint(0, 50) for _ in range(4)]
    plan = build_compress_plan(starts, num_new, ratio, overlap)
    commit, write = rows(plan.commit), rows(plan.write)
    first = 0
    for b, (s, n) in enumerate(zip(starts, num_new, strict=True)):
        mine = [r for r in commit if r[1] == b]
        entries = [(p + 1) // ratio - 1 for _, _, p, _ in mine]
        assert entries == list(range(s // ratio, (s + n) // ratio))
        for r, _, p, wl in mine:
            assert r == first + p - s and (p + 1) % ratio == 0
            assert wl == len([q for q in range(p - W + 1, p + 1) if 0 <= q < s])
        saved = [r for r in write if r[1] == b]
        assert [p for _, _, p, _ in saved] == list(range(max(s, s + n - W), s + n))
        assert len({ring for *_, ring in saved}) == len(saved)
        first += n
