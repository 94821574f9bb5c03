"""route (kernels/routing.py): Triton (the interpreter on the CPU; the presets' shapes with SPARSEPD_TEST_GPU=1)
against route_ref, ties included, and route_ref against model/moe.py's Gate, bit for bit."""

from __future__ import annotations

import math
import os

import pytest
import torch

from sparsepd.kernels.routing import route, route_ref
from sparsepd.model.moe import Gate
from sparsepd.model.numerics import softplus
from sparsepd.model_config import get_preset

GPU = os.environ.get("SPARSEPD_TEST_GPU") == "1" and torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not GPU, reason="needs a CUDA device and SPARSEPD_TEST_GPU=1")
SCALE = 1.5  # route_scale of v4-flash
EPS = torch.finfo(torch.float32).eps


def make_case(seed: int, n: int, num_experts: int, topk: int, bias: str, hash_ids: bool, device):
    """logits [n, E] fp32 on a grid of 1/16 in [-6, 6] (at E ≥ 16 many equal values: ties), with some far out
    (−100, −30, exactly 20, just above 20, 25); the last row all equal (every key ties: ids 0 … k−1). bias None,
    "grid" (0 or 0.25: ties between equal logits with equal bias) or "random" (small, continuous). Scores of
    distinct grid logits differ by far more than an ulp, so the order never hangs on a last-bit difference
    between two softplus implementations."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(-96, 97, (n, num_experts), generator=g).float() / 16
    special = torch.tensor([-100.0, -30.0, 20.0, 20.000002, 25.0])
    pick = torch.rand(n, num_experts, generator=g) < 0.05
    logits[pick] = special[torch.randint(0, len(special), (int(pick.sum()),), generator=g)]
    logits[-1] = 0.5
    b = {"none": None,
         "grid": (torch.rand(num_experts, generator=g) < 0.5).float() * 0.25,
         "random": torch.randn(num_experts, generator=g) * 0.1}[bias]
    ids = None
    if hash_ids:  # tid2eid rows: distinct ids a token
        ids = torch.stack([torch.randperm(num_experts, generator=g)[:topk] for _ in range(n)])
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(logits), to(b), to(ids)


def assert_matches_ref(got, logits, bias, topk, ids, ctx: str) -> None:
    """Ids equal; weights within (k + 1)·eps relative: the kernel adds the k chosen scores one at a time in slot
    order, torch's sum in its own order (k − 1 roundings of ≤ eps/2 each, then the division's and the scale's);
    a weight whose softplus is subnormal (logit < −87.3) within 2^-63 · scale / Σ absolute (flush-to-zero)."""
    want_w, want_ids = route_ref(logits, bias, topk, SCALE, ids)
    got_w, got_ids = (t.cpu() for t in got)
    rows = (got_ids != want_ids).any(1)
    assert got_ids.dtype == torch.int64 and torch.equal(got_ids, want_ids), (
        f"{ctx}: ids differ in rows {rows.nonzero().flatten()[:8].tolist()}: "
        f"got {got_ids[rows][:2].tolist()} want {want_ids[rows][:2].tolist()}")
    err = (got_w - want_w).abs()
    tol = (topk + 1) * EPS * want_w.abs()
    # a chosen logit below ln 2^-126: its softplus is subnormal, which a GPU's libm may flush to 0 (Triton links
    # libdevice flush-to-zero; the reference keeps it): that weight is then within sqrt(2^-126) · scale / Σ of
    # the reference's, Σ the row's chosen scores (kernels/routing.py's docstring)
    scores = torch.nn.functional.softplus(logits.double()).sqrt().gather(1, want_ids)
    flushable = logits.gather(1, want_ids) < math.log(torch.finfo(torch.float32).tiny)
    tol = torch.where(flushable, (2.0 ** -63 * SCALE / scores.sum(1, keepdim=True)).float(), tol)
    bad = ~(err <= tol)  # NaN (unwritten) is bad too
    assert not bad.any(), (f"{ctx}: {int(bad.sum())} weights off, at {bad.nonzero()[:8].tolist()}: "
                           f"got {got_w[bad][:4].tolist()} want {want_w[bad][:4].tolist()}")


@pytest.mark.parametrize("routing", ["none", "grid", "random", "hash"])
@pytest.mark.parametrize("topk", [6, 8])
@pytest.mark.parametrize("num_experts", [16, 256])
@pytest.mark.parametrize("n", [1, 7, 64])
def test_triton_matches_reference(n, num_experts, topk, routing, device):
    seed = 1000 * n + num_experts + 10 * topk + ["none", "grid", "random", "hash"].index(routing)
    logits, bias, ids = make_case(seed, n, num_experts, topk, "none" if routing == "hash" else routing,
                                  routing == "hash", device)
    out = (torch.full((n, topk), float("nan"), device=device), torch.full((n, topk), -1, device=device))  # poison
    got = route(logits, bias, topk, SCALE, ids, out=out, backend="triton")
    assert got[0] is out[0] and got[1] is out[1]
    assert_matches_ref(got, logits.cpu(), None if bias is None else bias.cpu(), topk,
                       None if ids is None else ids.cpu(), f"seed={seed} n={n} E={num_experts} k={topk} {routing}")


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide")  # row 2's weights: 0 / 0, as torch's
def test_ties_take_the_lower_expert_first(device):
    """Equal keys in reverse-sorted positions, -inf keys and every key equal: the stable order, exactly."""
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, 2.0, 2.0] + [-100.0] * 10,  # ties at the top and at the cut
                           [float("-inf")] * 16,  # every score 0: ids 0 … k−1
                           [3.0] * 8 + [4.0] * 8], device=device)
    bias = torch.tensor([0.0] * 15 + [float("-inf")], device=device)
    got_w, got_ids = route(logits, bias, 6, SCALE, backend="triton")
    assert got_ids.cpu().tolist() == [[4, 5, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5], [8, 9, 10, 11, 12, 13]]
    assert torch.equal(got_ids.cpu(), route_ref(logits.cpu(), bias.cpu(), 6, SCALE)[1])


def test_reference_is_the_models_gate():
    """route_ref after the gate's linear is what model/moe.py's Gate computed before, bit for bit (CPU)."""
    cfg = get_preset("tiny")
    for layer_id in (0, cfg.n_hash_layers):  # a hash layer, a biased top-k layer
        gate = Gate(cfg, layer_id, torch.float32)
        g = torch.Generator().manual_seed(layer_id)
        gate.weight.data = torch.randn(gate.weight.shape, generator=g) * 0.2
        if gate.hash:
            gate.tid2eid.data = torch.randint(0, cfg.n_routed_experts, gate.tid2eid.shape, generator=g)
        else:
            gate.bias.data = torch.randn(cfg.n_routed_experts, generator=g) * 0.1
        x, tokens = torch.randn(9, cfg.dim, generator=g), torch.randint(0, cfg.vocab_size, (9,), generator=g)
        scores = softplus(x @ gate.weight.T).sqrt()  # the former Gate.forward, on the same logits
        if gate.hash:
            indices = gate.tid2eid[tokens]
        else:
            indices = torch.sort(scores + gate.bias, dim=-1, descending=True, stable=True).indices[:, : gate.topk]
        weights = scores.gather(1, indices)
        weights = weights / weights.sum(-1, keepdim=True) * gate.route_scale
        got_w, got_ids = gate(x, tokens)
        assert torch.equal(got_ids, indices) and torch.equal(got_w, weights), f"layer {layer_id}"


def test_auto_on_cpu_is_the_reference():
    logits, bias, _ = make_case(4, 5, 16, 6, "random", False, "cpu")
    got, want = route(logits, bias, 6, SCALE), route_ref(logits, bias, 6, SCALE)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bad_arguments_are_rejected():
    logits, bias, ids = make_case(5, 3, 16, 6, "random", True, "cpu")
    with pytest.raises(ValueError, match="logits must be"):
        route(logits.half(), bias, 6, SCALE)
    with pytest.raises(ValueError, match="topk must be"):
        route(logits, bias, 17, SCALE)
    with pytest.raises(ValueError, match="topk ≤ 16"):
        route(torch.zeros(2, 32), None, 17, SCALE, backend="triton")
    with pytest.raises(ValueError, match="bias must be"):
        route(logits, bias[:8], 6, SCALE)
    with pytest.raises(ValueError, match="indices must be"):
        route(logits, None, 6, SCALE, ids[:, :4])
    with pytest.raises(ValueError, match="E ≤ 1024"):
        route(torch.zeros(2, 2048), None, 6, SCALE, backend="triton")


@gpu_only
@pytest.mark.parametrize("num_experts,scale", [(16, 1.5), (256, 1.5), (384, 2.5)])
@pytest.mark.parametrize("n", [1, 64, 8192])
def test_gpu_presets(n, num_experts, scale):
    """The presets' gates on the GPU: ids equal, weights within the sum order's ulps, scores' libm as torch's."""
    logits, bias, _ = make_case(n + num_experts, n, num_experts, 6, "random", False, "cuda")
    got = route(logits, bias, 6, scale)
    want_w, want_ids = route_ref(logits, bias, 6, scale)
    assert torch.equal(got[1], want_ids)
    assert ((got[0] - want_w).abs() <= 7 * EPS * want_w.abs()).all()
