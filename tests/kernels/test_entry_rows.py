"""entry_rows (kernels/entry_rows.py): Triton (the interpreter on the CPU; the GPU with SPARSEPD_TEST_GPU=1)
against entry_rows_ref, exactly, and the reference against the rows written out one by one."""

from __future__ import annotations

import pytest
import torch

from sparsepd.kernels.entry_rows import entry_rows, entry_rows_ref


def make_case(seed: int, T: int, K: int, B: int, P: int, rpp: int, dtype: torch.dtype, device):
    """top: each token's entry positions below its request's visible count, −1 padding at random places (and a
    row of only −1); a page table of distinct random pages; tokens spread over the requests."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, B, (T,), generator=g, dtype=torch.int32)
    table = torch.randperm(B * P + 7, generator=g)[: B * P].reshape(B, P).to(torch.int32)
    top = torch.randint(0, P * rpp, (T, K), generator=g)
    top = torch.where(torch.rand(T, K, generator=g) < 0.2, -1, top)
    if T > 2:
        top[2] = -1
    return top.to(dtype).to(device), table.to(device), seq.to(device)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("T,K,rpp", [(1, 8, 32), (5, 33, 32), (17, 512, 32), (3, 1500, 1)])
def test_triton_equals_reference(T, K, rpp, dtype, device):
    top, table, seq = make_case(T + K, T, K, 4, 6, rpp, dtype, device)
    base = 1000
    got = entry_rows(top, table, seq, rpp, base, backend="triton")
    want = entry_rows_ref(top.cpu(), table.cpu(), seq.cpu(), rpp, base)
    assert got.dtype == torch.int32 and torch.equal(got.cpu(), want)


def test_reference_by_hand():
    top, table, seq = make_case(3, 6, 10, 3, 5, 4, torch.int64, "cpu")
    got = entry_rows_ref(top, table, seq, 4, 77)
    for t in range(6):
        for j in range(10):
            e = int(top[t, j])
            want = -1 if e < 0 else 77 + int(table[int(seq[t]), e // 4]) * 4 + e % 4
            assert int(got[t, j]) == want, (t, j)
    assert (got[2] == -1).all()


def test_strided_top_and_empty(device):
    top, table, seq = make_case(5, 4, 20, 2, 3, 8, torch.int64, device)
    wide = torch.cat([top, top], 1)[:, 20:]
    assert torch.equal(entry_rows(wide, table, seq, 8, 0, backend="triton").cpu(),
                       entry_rows_ref(top.cpu(), table.cpu(), seq.cpu(), 8, 0))
    empty = entry_rows(top[:0], table, seq[:0], 8, 0, backend="triton")
    assert empty.shape == (0, 20)


def test_bad_arguments_are_rejected():
    top, table, seq = make_case(6, 4, 8, 2, 3, 8, torch.int64, "cpu")
    with pytest.raises(ValueError, match="seq_ids"):
        entry_rows(top, table, seq[:3], 8, 0)
    with pytest.raises(ValueError, match="rows_per_page"):
        entry_rows(top, table, seq, 0, 0)
