"""Ring writes (kernels/state_update.py): Triton (interpreter on CPU, real shapes with SPARSEPD_TEST_GPU=1)
against the references and against the definition (ring row p % size holds position p)."""

import os

import pytest
import torch

from sparsepd.kernels.compress_plan import build_compress_plan, build_write_plan
from sparsepd.kernels.state_update import (
    compressor_state_write,
    compressor_state_write_ref,
    swa_ring_write,
    swa_ring_write_ref,
)

ON_GPU = os.environ.get("SPARSEPD_TEST_GPU") == "1"
# (starts, num_new): fresh prefill, chunk ending mid-block, decodes at mixed positions, an empty request
BATCHES = [([0], [37]), ([6, 0, 130], [7, 3, 1]), ([3, 4, 7, 11, 255], [1] * 5), ([9, 2], [0, 20])]


def make_case(seed, starts, num_new, ratio, overlap, d, device, num_slots=8):
    g = torch.Generator().manual_seed(seed)
    coff = 2 if overlap else 1
    width, size = coff * d, coff * ratio
    n = sum(num_new)
    kv = torch.randn(n, width, generator=g)
    score = torch.randn(n, width, generator=g)
    ape = torch.randn(ratio, width, generator=g)
    slot_ids = torch.randperm(num_slots, generator=g)[: len(starts)]
    rings = torch.full((num_slots, size, width), float("nan"))  # poison: unwritten rows stay NaN
    return [t.to(device) for t in (kv, score, ape, rings, rings.clone(), slot_ids)]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("ratio,overlap", [(4, True), (16, False)])
def test_compressor_state_write_matches_reference_and_definition(batch, ratio, overlap, device):
    starts, num_new = batch
    kv, score, ape, ks, ss, slot_ids = make_case(1, starts, num_new, ratio, overlap, 24, device)
    plan = build_compress_plan(starts, num_new, ratio, overlap, device=device)
    ks_ref, ss_ref = ks.clone(), ss.clone()
    compressor_state_write(kv, score, ape, ks, ss, slot_ids, plan, backend="triton")
    compressor_state_write_ref(kv, score, ape, ks_ref, ss_ref, slot_ids, plan)
    assert torch.equal(ks.isnan(), ks_ref.isnan()) and torch.equal(ss.isnan(), ss_ref.isnan())
    assert torch.equal(ks.nan_to_num(), ks_ref.nan_to_num()) and torch.equal(ss.nan_to_num(), ss_ref.nan_to_num())
    # the definition: ring row p % S of the request's slot holds position p for its last S positions
    S, first, written = plan.state_size, 0, 0
    for b, (s, n) in enumerate(zip(starts, num_new, strict=True)):
        for p in range(max(s, s + n - S), s + n):
            r = first + p - s
            assert torch.equal(ks[slot_ids[b], p % S], kv[r])
            assert torch.equal(ss[slot_ids[b], p % S], score[r] + ape[p % ratio])
            written += 1
        first += n
    assert int((~ks.isnan()).all(-1).sum()) == written  # nothing else was touched


def test_fixed_capacity_rows_are_skipped(device):
    starts, num_new = [3, 4, 7], [1, 1, 1]
    kv, score, ape, ks, ss, slot_ids = make_case(2, starts, num_new, 4, True, 24, device)
    plan = build_compress_plan(starts, num_new, 4, True, device=device, capacity=8, write_capacity=8)
    compressor_state_write(kv, score, ape, ks, ss, slot_ids, plan, backend="triton")
    assert int((~ks.isnan()).all(-1).sum()) == 3 and int((~ss.isnan()).all(-1).sum()) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", BATCHES)
def test_swa_ring_write(batch, dtype, device):
    starts, num_new = batch
    window, D, num_slots = 16, 40, 8
    g = torch.Generator().manual_seed(3)
    kv = torch.randn(sum(num_new), D, generator=g).to(dtype).to(device)
    slot_ids = torch.randperm(num_slots, generator=g)[: len(starts)].to(device)
    ring = torch.full((num_slots, window, D), float("nan"), dtype=dtype, device=device)
    ring_ref = ring.clone()
    plan = build_write_plan(starts, num_new, window, device=device, capacity=sum(num_new) + 3)
    swa_ring_write(kv, ring, slot_ids, plan, backend="triton")
    swa_ring_write_ref(kv, ring_ref, slot_ids, plan)
    assert torch.equal(ring.isnan(), ring_ref.isnan())
    assert torch.equal(ring.nan_to_num(), ring_ref.nan_to_num())
    first = 0
    for b, (s, n) in enumerate(zip(starts, num_new, strict=True)):
        for p in range(max(s, s + n - window), s + n):
            assert torch.equal(ring[slot_ids[b], p % window], kv[first + p - s])
        first += n
    assert int((~ring.isnan()).all(-1).sum()) == sum(min(n, window) for n in num_new)


def test_bad_inputs_raise():
    kv, score, ape, ks, ss, slot_ids = make_case(4, [0], [9], 4, True, 8, "cpu")
    plan = build_compress_plan([0], [9], 4, True)
    with pytest.raises(ValueError, match="state_size"):
        compressor_state_write(kv, score, ape, ks[:, :4].contiguous(), ss[:, :4].contiguous(), slot_ids, plan)
    with pytest.raises(ValueError, match="float32"):
        compressor_state_write(kv.double(), score, ape, ks, ss, slot_ids, plan)
    with pytest.raises(ValueError, match="ape"):
        compressor_state_write(kv, score, ape[:2], ks, ss, slot_ids, plan)
    with pytest.raises(ValueError, match="RowPlan"):
        swa_ring_write(kv, ks, slot_ids, plan)
    with pytest.raises(ValueError, match="dtype"):
        swa_ring_write(kv, ks.half(), slot_ids, plan.write)


@pytest.mark.skipif(not ON_GPU, reason="real shapes on the GPU")
def test_real_shapes(device):
    starts, num_new = [0] * 4 + [4095] * 64, [4096] * 4 + [1] * 64
    kv, score, ape, ks, ss, slot_ids = make_case(5, starts, num_new, 4, True, 512, device, num_slots=128)
    plan = build_compress_plan(starts, num_new, 4, True, device=device)
    ks_ref, ss_ref = ks.clone(), ss.clone()
    compressor_state_write(kv, score, ape, ks, ss, slot_ids, plan)
    compressor_state_write_ref(kv, score, ape, ks_ref, ss_ref, slot_ids, plan)
    assert torch.equal(ks.nan_to_num(), ks_ref.nan_to_num()) and torch.equal(ss.nan_to_num(), ss_ref.nan_to_num())
    assert torch.equal(ks.isnan(), ks_ref.isnan())
