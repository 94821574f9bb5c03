"""The expert-parallel exchange's rows (kernels/ep_rows.py): the reference's bytes are the documented layout, the
Triton pack gives the same bytes and rows bit for bit, the Triton combine the same sums bit for bit (one order of
fp32 additions: rank order), and a whole exchange of W simulated ranks sums each token's expert terms.

Fresh random routing per case: tokens sent to one rank, to several and (W ≥ 2) to none of some ranks, repeated
expert ids (a hash layer's table may repeat one); W = 1, 2, 4; k = 2 (`tiny`) and 6 (`bench`); dims of `tiny`
(64, fp32) and `bench` (4096, bf16); n = 0, 1, 17, 300 (two count steps) and 1100 (the 64-token blocks); int32 and
int64 ids; strided weights and ids. Outputs the Triton path allocates start poisoned."""

from __future__ import annotations

import os

import pytest
import torch

from sparsepd.kernels import ep_rows
from sparsepd.kernels.ep_rows import (
    combine_ep_rows,
    combine_ep_rows_ref,
    ep_row_bytes,
    ep_row_fields,
    pack_ep_rows,
    pack_ep_rows_ref,
)

ON_GPU = os.environ.get("SPARSEPD_TEST_GPU") == "1"
POISON = {torch.uint8: 0xAB, torch.int32: -777, torch.float32: float("nan")}
# (dim, dtype, experts, k): tiny's and bench's MoE
SHAPES = [(64, torch.float32, 8, 2), (4096, torch.bfloat16, 16, 6)]


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Every buffer the Triton path allocates starts as a poison value (bytes 0xAB, int32 −777, fp32 NaN)."""
    monkeypatch.setattr(ep_rows, "_empty", lambda shape, dtype, device: torch.full(shape, POISON[dtype], dtype=dtype,
                                                                                   device=device))


def routing(seed: int, n: int, experts: int, k: int, world: int, device, id_dtype=torch.int64, strided=False):
    """x-independent routing: distinct top-k ids for most tokens, every 5th token's experts all on one rank, every
    7th token with a repeated id; fp32 weights. `strided`: both views of wider tensors (non-unit strides)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(n, experts, generator=g).argsort(1)[:, :k]  # [n, k] distinct
    per = experts // world
    for t in range(0, n, 5):  # all on rank r
        r = int(torch.randint(0, world, (), generator=g))
        ids[t] = r * per + torch.randint(0, per, (k,), generator=g)
    for t in range(3, n, 7):
        ids[t, -1] = ids[t, 0]
    weights = torch.rand(n, k, generator=g) + 0.01
    if strided:
        wide_ids = torch.full((n, 2 * k), 12345, dtype=torch.int64)
        wide_ids[:, ::2] = ids
        wide_w = torch.full((k, n), float("nan"))
        wide_w.copy_(weights.t())
        ids, weights = wide_ids.to(id_dtype).to(device)[:, ::2], wide_w.to(device).t()
        assert n < 2 or not (ids.is_contiguous() or weights.is_contiguous())
        return weights, ids
    return weights.to(device), ids.to(id_dtype).to(device)


def activations(seed: int, n: int, dim: int, dtype, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, dim, generator=g) * 3).to(dtype).to(device)


def test_row_bytes():
    assert ep_row_bytes(4096, torch.bfloat16, 6) == 8192 + 48 + 16  # to a multiple of 64
    assert ep_row_bytes(64, torch.float32, 2) == 256 + 16 + 48
    assert ep_row_bytes(7168, torch.bfloat16, 6) == 14336 + 48 + 16


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("dim,dtype,experts,k", SHAPES)
def test_reference_layout_by_hand(world, dim, dtype, experts, k):
    """Block p: the tokens with an expert on p in token order, their x bits, ids local to p (−1 elsewhere) and
    weights; then padding rows (zeros, ids −1); pos names each token's row, −1 where it is not sent."""
    n, per = 23, experts // world
    x = activations(1, n, dim, dtype, "cpu")
    weights, ids = routing(2, n, experts, k, world, "cpu")
    send, pos = pack_ep_rows_ref(x, weights, ids, world, per)
    assert send.shape == (world * n, ep_row_bytes(dim, dtype, k)) and pos.shape == (world, n)
    fx, fids, fw = ep_row_fields(send, dim, dtype, k)
    for p in range(world):
        sent = [t for t in range(n) if any(p * per <= int(e) < (p + 1) * per for e in ids[t])]
        assert pos[p].tolist() == [sent.index(t) if t in sent else -1 for t in range(n)], p
        for row, t in enumerate(sent):
            r = p * n + row
            assert torch.equal(fx[r].view(torch.uint8), x[t].view(torch.uint8)), (p, t)
            expect = [int(e) - p * per if p * per <= int(e) < (p + 1) * per else -1 for e in ids[t]]
            assert fids[r].tolist() == expect, (p, t)
            assert torch.equal(fw[r], weights[t]), (p, t)
        pad = send[p * n + len(sent):(p + 1) * n]
        assert (fids[p * n + len(sent):(p + 1) * n] == -1).all(), p
        assert (pad[:, :dim * dtype.itemsize] == 0).all() and (pad[:, dim * dtype.itemsize + 4 * k:] == 0).all(), p
    assert (send[:, dim * dtype.itemsize + 8 * k:] == 0).all()  # every row's tail
    for field in (fx, fids, fw):
        assert field.stride(0) % 16 == 0 and field.stride(1) == 1


def test_tokens_to_none_of_a_rank():
    """W = 4, k = 2: each token reaches at most two ranks; the tiny routing sends some to exactly one."""
    weights, ids = routing(3, 40, 8, 2, 4, "cpu")
    _, pos = pack_ep_rows_ref(activations(0, 40, 64, torch.float32, "cpu"), weights, ids, 4, 2)
    reached = (pos >= 0).sum(0)
    assert reached.min() == 1 and reached.max() == 2 and (pos < 0).any(1).all()


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("n", [0, 1, 17, 300, 1100])
@pytest.mark.parametrize("dim,dtype,experts,k", SHAPES)
def test_pack_matches_reference_bit_for_bit(world, n, dim, dtype, experts, k, device):
    if n >= 1100 and dim > 64 and not ON_GPU:
        pytest.skip("the interpreter at bench width: n ≤ 300")
    seed = 1000 * world + n
    for id_dtype, strided in ((torch.int64, False), (torch.int32, True)):
        x = activations(seed, n, dim, dtype, device)
        weights, ids = routing(seed + 1, n, experts, k, world, device, id_dtype, strided)
        send, pos = pack_ep_rows(x, weights, ids, world, experts // world, backend="triton")
        ref_send, ref_pos = pack_ep_rows_ref(x.cpu(), weights.cpu(), ids.cpu(), world, experts // world)
        ctx = f"seed {seed} W {world} n {n} dim {dim} {dtype} k {k} {id_dtype} strided {strided}"
        assert torch.equal(pos.cpu(), ref_pos), f"{ctx}: pos differ at {(pos.cpu() != ref_pos).nonzero()[:5].tolist()}"
        bad = (send.cpu() != ref_send).nonzero()
        assert send.shape == ref_send.shape and bad.numel() == 0, f"{ctx}: bytes differ at {bad[:5].tolist()}"


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("n", [0, 1, 17, 300])
@pytest.mark.parametrize("dim", [64, 4096])
def test_combine_matches_reference_bit_for_bit(world, n, dim, device):
    """Rows nothing was sent for hold NaN: the combine must not read them. The sums equal the reference's bit for
    bit, lie within fp32 rounding of the fp64 sum, and with W = 1 are the rows themselves."""
    seed = 7 * world + n + dim
    weights, ids = routing(seed, n, 16, 6, world, "cpu")
    _, pos = pack_ep_rows_ref(activations(seed, n, 8, torch.float32, "cpu"), weights, ids, world, 16 // world)
    g = torch.Generator().manual_seed(seed)
    back = torch.randn(world * n, dim, generator=g) * torch.exp2(torch.randint(-8, 8, (world * n, 1), generator=g))
    used = torch.zeros(world * n, dtype=torch.bool)
    for p in range(world):
        used[p * n + pos[p][pos[p] >= 0].long()] = True
    back[~used] = float("nan")
    got = combine_ep_rows(back.to(device), pos.to(device), backend="triton").cpu()
    ref = combine_ep_rows_ref(back, pos)
    ctx = f"seed {seed} W {world} n {n} dim {dim}"
    assert got.shape == (n, dim) and not got.isnan().any(), f"{ctx}: unwritten or padding rows read"
    assert torch.equal(got, ref), f"{ctx}: max |Δ| {(got - ref).abs().max():.3g}"
    exact = torch.zeros(n, dim, dtype=torch.float64)
    magnitude = torch.zeros(n, dim, dtype=torch.float64)
    for p in range(world):
        sent = (pos[p] >= 0).nonzero().flatten()
        terms = back[p * n + pos[p, sent].long()].double()
        exact[sent] += terms
        magnitude[sent] += terms.abs()
    bound = (world - 1) * 2.0**-24 * magnitude  # W − 1 roundings of partial sums, each ≤ u · Σ |terms|
    assert ((ref.double() - exact).abs() <= bound).all(), ctx
    if world == 1:
        assert torch.equal(ref, back[pos[0].long()]), ctx


def exchange(xs, weights, ids, world, per, pack):
    """W ranks' all_to_all, simulated: rank q's `send` block p goes to rank p (in rank order); the receivers'
    rows, and for the way back each rank's `back` from the receivers' results."""
    packed = [pack(x, w, i, world, per) for x, w, i in zip(xs, weights, ids, strict=True)]
    ns = [x.shape[0] for x in xs]
    recv = [torch.cat([packed[q][0][p * ns[q]:(p + 1) * ns[q]] for q in range(world)]) for p in range(world)]
    return packed, ns, recv


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("dim,dtype,experts,k", SHAPES)
def test_exchange_sums_each_tokens_experts(world, dim, dtype, experts, k, device):
    """W simulated ranks with different token counts (one with none): each receiver evaluates its rows through the
    field views (a stand-in expert: w · (id + 1) · x per held slot), the rows go back, the Triton combine sums;
    every token gets Σ_j w_j · (e_j + 1) · x over all its k slots, whichever rank holds each expert."""
    per = experts // world
    counts = [5, 0, 17, 1][:world] if world > 1 else [9]
    xs = [activations(50 + q, n, dim, dtype, device) for q, n in enumerate(counts)]
    routes = [routing(60 + q, n, experts, k, world, device) for q, n in enumerate(counts)]
    weights, ids = [r[0] for r in routes], [r[1] for r in routes]
    pack = lambda *a: pack_ep_rows(*a, backend="triton")  # noqa: E731
    packed, ns, recv = exchange(xs, weights, ids, world, per, pack)
    results = []
    for p in range(world):
        fx, fids, fw = ep_row_fields(recv[p], dim, dtype, k)
        assert fx.data_ptr() == recv[p].data_ptr() or recv[p].numel() == 0  # a view, not a copy
        held = fids >= 0
        scale = torch.where(held, fw.double() * (p * per + fids + 1).double(), 0.0).sum(1)  # [R]
        results.append((scale[:, None] * fx.double()).float())  # [R, dim]
    for q in range(world):
        # rows of rank q's block p come back from rank p at offset Σ_{q' < q} n_q'
        back = torch.cat([results[p][sum(ns[:q]):sum(ns[:q + 1])] for p in range(world)])  # [W·n_q, dim]
        got = combine_ep_rows(back, packed[q][1], backend="triton").double().cpu()
        coef = (weights[q].double() * (ids[q].double() + 1)).sum(1).cpu()  # [n_q]
        want = coef[:, None] * xs[q].double().cpu()
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-5 * world * k, atol=0), f"rank {q}: max |Δ| {(got - want).abs().max()}"


def test_checks_raise_with_values():
    x = torch.zeros(3, 63, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 4 bytes"):
        pack_ep_rows(x, torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.int64), 2, 4)
    with pytest.raises(ValueError, match="weights must be fp32"):
        pack_ep_rows(torch.zeros(3, 64), torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.int64),
                     2, 4)
    with pytest.raises(ValueError, match=r"back must be fp32 \[W·n=6"):
        combine_ep_rows(torch.zeros(5, 8), torch.zeros(2, 3, dtype=torch.int32))
