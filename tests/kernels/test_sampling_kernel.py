"""kernels/sampling.py: batched sampling equals the per-request definitions, draws from the right
distribution, and a seed's tokens do not depend on the batch, the row or the path (batched or `Sampler`).

With SPARSEPD_TEST_GPU=1 the batched path also runs on CUDA (equal to the CPU result) and inside a CUDA graph.
"""

import math
import os

import pytest
import torch

from sparsepd.engine.sampling import Sampler, SamplingParams, filter_probs, sampling_tensors, token_logprobs
from sparsepd.kernels.sampling import (
    SampleOutput,
    SamplingTensors,
    exponentials,
    exponentials_ref,
    random_bits,
    sample_batch,
    sample_batch_ref,
)

ON_GPU = os.environ.get("SPARSEPD_TEST_GPU") == "1"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs SPARSEPD_TEST_GPU=1 and a CUDA device")


def make_logits(seed: int, B: int, V: int) -> torch.Tensor:
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3  # [B, V]


def make_params(B: int, *, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0, seed=0, counter=0, ban_ids=None,
                want_top_logprobs=0, device="cpu") -> SamplingTensors:
    """Scalars broadcast over the rows; sequences give one value per row."""
    def col(v, dtype):
        return (torch.tensor(v, dtype=dtype) if isinstance(v, list | tuple) else torch.full((B,), v, dtype=dtype)
                ).to(device)
    ban = torch.full((B, 1), -1, dtype=torch.int64) if ban_ids is None else torch.as_tensor(ban_ids, dtype=torch.int64)
    return SamplingTensors(temperature=col(temperature, torch.float32), top_k=col(top_k, torch.int32),
                           top_p=col(top_p, torch.float32), min_p=col(min_p, torch.float32),
                           seed=col(seed, torch.int64), counter=col(counter, torch.int64), ban_ids=ban.to(device),
                           want_top_logprobs=want_top_logprobs)


def random_params(seed: int, B: int, V: int, device="cpu") -> SamplingTensors:
    """Every regime mixed in one batch: greedy, top_k = 1, top-k/top-p/min-p alone and together, bans."""
    g = torch.Generator().manual_seed(seed)
    temperature = (torch.rand(B, generator=g) * 1.5 + 0.2).tolist()
    top_k = torch.randint(-1, V + 3, (B,), generator=g).tolist()
    top_p = torch.where(torch.rand(B, generator=g) < 0.5, 1.0, torch.rand(B, generator=g) * 0.9 + 0.05).tolist()
    min_p = torch.where(torch.rand(B, generator=g) < 0.5, 0.0, torch.rand(B, generator=g) * 0.3).tolist()
    temperature[0] = 0.0
    if B > 1:
        top_k[1] = 1
    ban = torch.randint(-1, V + 2, (B, 3), generator=g)  # −1 padding and ids ≥ V (ignored) included
    return make_params(B, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                       seed=torch.randint(0, 2**63 - 1, (B,), generator=g).tolist(),
                       counter=torch.randint(0, 10**6, (B,), generator=g).tolist(), ban_ids=ban,
                       want_top_logprobs=min(5, V), device=device)


# --- the random stream -----------------------------------------------------------------------------------
def _mix32_int(x: int) -> int:
    """lowbias32 on Python integers: the definition the tensor version must reproduce bit for bit."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _bits_int(seed: int, counter: int, token: int) -> int:
    keys = []
    for init in (0x2545F491, 0x9E3779B9):
        k = init
        for w in (seed & 0xFFFFFFFF, seed >> 32, counter & 0xFFFFFFFF, counter >> 32):
            k = _mix32_int(k ^ w)
        keys.append(k)
    return _mix32_int(_mix32_int(token ^ keys[0]) ^ keys[1])


def test_random_bits_equal_the_integer_definition():
    seeds = [0, 1, 123456789012345, 2**63 - 1]
    counters = [0, 1, 2**31 + 5, 2**62 + 3]
    tokens = [0, 1, 2, 2**16 + 1, 129279]
    rows = [(s, c) for s in seeds for c in counters]
    got = random_bits(torch.tensor([s for s, _ in rows]), torch.tensor([c for _, c in rows]), 129280)[:, tokens]
    assert got.tolist() == [[_bits_int(s, c, t) for t in tokens] for s, c in rows]
    # pinned: a seed's stream must not change between versions (requests are replayed by seed)
    assert random_bits(torch.tensor([42]), torch.tensor([7]), 3)[0].tolist() == [_bits_int(42, 7, t) for t in range(3)]
    assert [_bits_int(42, 7, t) for t in range(3)] == [2781945464, 986880772, 974689427]


@pytest.mark.parametrize("B,V", [(1, 1), (3, 1500), (5, 2**10 + 17)])
def test_exponentials_kernel_equals_reference(B, V, device):
    g = torch.Generator().manual_seed(B * V)
    seed = torch.randint(0, 2**63 - 1, (B,), generator=g)
    seed[0] = 2**63 - 1
    counter = torch.randint(0, 2**40, (B,), generator=g)
    got = exponentials(seed.to(device), counter.to(device), V, backend="triton").cpu()
    want = exponentials_ref(seed, counter, V)
    # the bits are exact; the fp64 log may differ in its last bit, which can move the fp32 rounding by one ulp
    torch.testing.assert_close(got, want, rtol=2.5e-7, atol=0)


def test_exponentials_kernel_reads_strided_seed_and_counter_columns(device):
    """sampling_tensors hands the kernel columns of one int table (stride > 1): each row must get its own."""
    table = torch.tensor([[5, 0, 99], [6, 1, 98], [2**40 + 3, 7, 97]])  # seed, counter, other
    got = exponentials(table[:, 0].to(device), table[:, 1].to(device), 300, backend="triton").cpu()
    want = exponentials_ref(table[:, 0].contiguous(), table[:, 1].contiguous(), 300)
    torch.testing.assert_close(got, want, rtol=2.5e-7, atol=0)


def test_exponentials_are_exp1_and_independent():
    B, V = 64, 1024
    e = exponentials_ref(torch.arange(B) * 1000003, torch.arange(B) % 7, V).double()  # [B, V]
    n = e.numel()
    assert abs(e.mean().item() - 1) < 5 / math.sqrt(n)  # mean 1, sd 1
    u = torch.exp(-e)  # uniform(0, 1) if E ~ Exp(1)
    counts = torch.histc(u, bins=64, min=0, max=1)
    chi2 = float(((counts - n / 64) ** 2 / (n / 64)).sum())
    assert chi2 < chi2_bound(63), chi2
    for a, b in [(u[:, 1:], u[:, :-1]), (u[1:], u[:-1])]:  # neighbouring token ids, neighbouring rows
        corr = float(((a - 0.5) * (b - 0.5)).mean() * 12)
        assert abs(corr) < 5 / math.sqrt(a.numel()), corr


# --- (a) reproducible whatever the batch ------------------------------------------------------------------
def test_seeded_draws_do_not_depend_on_the_batch_or_the_path():
    V, steps = 300, 12
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, min_p=0.01, seed=1234)
    logits = [make_logits(100 + i, 1, V)[0] for i in range(steps)]
    sampler = Sampler(params, V)

    def alone(step: int, seed: int) -> int:
        p = make_params(1, temperature=0.9, top_k=50, top_p=0.95, min_p=0.01, seed=seed, counter=step)
        return int(sample_batch(logits[step][None], p).tokens[0])

    solo = [alone(i, 1234) for i in range(steps)]
    assert solo != [int(row.argmax()) for row in logits]  # it does sample
    assert solo != [alone(i, 1235) for i in range(steps)]  # and the seed matters
    mine = dict(temperature=0.9, top_k=50, top_p=0.95, min_p=0.01, seed=1234)
    fields = ("temperature", "top_k", "top_p", "min_p", "seed", "counter")
    for i in range(steps):
        others = random_params(7 + i, 4, V)
        pos = i % 5  # a different row each step, among 4 other requests
        rows = [logits[i] if r == pos else make_logits(1000 * i + r, 1, V)[0] for r in range(5)]
        columns = {f: getattr(others, f).tolist() for f in fields}
        for f in fields:
            columns[f].insert(pos, mine.get(f, i))
        mixed = make_params(5, **columns)
        assert int(sample_batch(torch.stack(rows), mixed).tokens[pos]) == solo[i], (i, pos)
        assert int(sample_batch_ref(torch.stack(rows), mixed).tokens[pos]) == solo[i], (i, pos)
        assert sampler.sample(logits[i]) == solo[i], i  # the per-request path
    # the scheduler's helper: counter = n_generated
    built = [sampling_tensors([(params, Sampler(params, V), i, 0)], "cpu") for i in range(steps)]
    assert [int(sample_batch(logits[i][None], built[i]).tokens[0]) for i in range(steps)] == solo


def test_sampler_state_ships_mid_stream():
    V = 300
    params = SamplingParams(temperature=1.1, top_p=0.9, seed=77)
    logits = [make_logits(200 + i, 1, V)[0] for i in range(8)]
    whole = Sampler(params, V)
    expected = [whole.sample(row) for row in logits]
    first = Sampler(params, V)
    head = [first.sample(row) for row in logits[:3]]
    state = first.get_state()
    assert len(state) == Sampler.STATE_BYTES == 16
    second = Sampler(SamplingParams(temperature=1.1, top_p=0.9), V)  # no seed: its own random one, replaced
    second.set_state(state)
    assert head + [second.sample(row) for row in logits[3:]] == expected
    assert second.get_state() == whole.get_state()
    batched = Sampler(params, V)
    batched.advance(3)  # three tokens drawn by the batched path
    assert batched.get_state() == state


@pytest.mark.parametrize("bad", [b"", b"\0" * 15, b"\0" * 17, b"\0" * 5056, b"\xff" * 8 + b"\0" * 8,
                                 b"\0" * 8 + b"\xff" * 8, "sixteen chars!!!"])
def test_sampler_state_rejects_bad_bytes(bad):
    sampler = Sampler(SamplingParams(seed=5), 300)
    with pytest.raises(ValueError, match="sampler state"):
        sampler.set_state(bad)
    assert sampler.get_state() == (5).to_bytes(8, "little") + bytes(8)  # unchanged


def test_unseeded_samplers_draw_their_own_seed():
    seeds = {Sampler(SamplingParams(temperature=1.0), 300).seed for _ in range(8)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)


# --- the batched path equals the row-by-row reference ------------------------------------------------------
@pytest.mark.parametrize("B,V", [(1, 1), (2, 7), (17, 300), (9, 2**10 + 17)])
@pytest.mark.parametrize("seed", [0, 1])
def test_batched_equals_reference(B, V, seed):
    logits = make_logits(seed, B, V)
    params = random_params(seed, B, V)
    got, want = sample_batch(logits, params), sample_batch_ref(logits, params)
    bad = (got.tokens != want.tokens).nonzero().flatten().tolist()
    assert not bad, f"seed {seed}, B={B}, V={V}: rows {bad} got {got.tokens[bad].tolist()} want {want.tokens[bad]}"
    assert torch.equal(got.top_ids, want.top_ids)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.top_logprobs, want.top_logprobs, rtol=0, atol=1e-6)


def test_batched_equals_reference_over_many_counters():
    """One row's regime at a time over 200 counters each: exercises the race, not only the greedy rows."""
    V = 50
    logits = make_logits(3, 1, V).expand(200, V).contiguous()
    for kw in [dict(temperature=0.8), dict(top_k=5), dict(top_p=0.7), dict(min_p=0.2),
               dict(temperature=1.3, top_k=9, top_p=0.9, min_p=0.05)]:
        params = make_params(200, seed=99, counter=list(range(200)), **kw)
        got, want = sample_batch(logits, params).tokens, sample_batch_ref(logits, params).tokens
        assert torch.equal(got, want), (kw, (got != want).nonzero().flatten().tolist())
        assert len(set(got.tolist())) > 1, kw


def test_host_promises_skip_work_without_changing_tokens():
    B, V = 40, 300
    logits = make_logits(6, B, V)
    counters = list(range(B))
    ban = torch.randint(-1, V, (B, 2), generator=torch.Generator().manual_seed(6))
    greedy = make_params(B, temperature=[0.0, 1.3] * (B // 2), top_k=[-1, 1] * (B // 2), ban_ids=ban,
                         counter=counters)
    fast = make_params(B, temperature=[0.0, 1.3] * (B // 2), top_k=[-1, 1] * (B // 2), ban_ids=ban,
                       counter=counters)
    fast.all_greedy = True
    assert torch.equal(sample_batch(logits, fast).tokens, sample_batch(logits, greedy).tokens)
    # top-k ≤ 0 or ≥ V-ish and top-p = 1 on the sampled rows (top_k = 1 rows are greedy): no sort needed
    kw = dict(temperature=[0.0, 0.9, 1.1, 0.7] * (B // 4), top_k=[5, -1, 0, 1] * (B // 4),
              min_p=[0.0, 0.1, 0.0, 0.3] * (B // 4), top_p=[0.5, 1.0, 1.0, 0.5] * (B // 4), seed=4, counter=counters)
    full, cheap = make_params(B, **kw), make_params(B, **kw)
    cheap.uses_top_k_or_p = False
    got, want = sample_batch(logits, cheap).tokens, sample_batch(logits, full).tokens
    assert torch.equal(got, want)
    assert torch.equal(want, sample_batch_ref(logits, full).tokens)


# --- (b) the empirical distribution ----------------------------------------------------------------------
def chi2_bound(df: int, z: float = 4.753) -> float:
    """The chi-square quantile at upper tail z σ (4.753: p = 1e-6), Wilson–Hilferty approximation."""
    a = 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def chi2_against(tokens: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's statistic over the expected support; inf if any draw falls outside it."""
    counts = torch.bincount(tokens, minlength=expected.numel()).double()
    n, support = counts.sum(), expected > 0
    if counts[~support].sum() > 0:
        return math.inf
    e = expected.double()[support] * n
    return float(((counts[support] - e) ** 2 / e).sum())


DIST_V, DIST_N = 12, 20_000
# (parameters, the same with one of them ignored or wrong: distributions the test must tell apart)
DIST_CASES = [
    (dict(temperature=0.6), [dict(temperature=1.0)]),
    (dict(temperature=1.2, top_k=5), [dict(temperature=1.2), dict(temperature=0.9, top_k=5)]),
    (dict(temperature=1.0, top_p=0.7), [dict(temperature=1.0), dict(temperature=1.3, top_p=0.7)]),
    (dict(temperature=1.0, min_p=0.2), [dict(temperature=1.0), dict(temperature=0.8, min_p=0.2)]),
    (dict(temperature=0.8, top_k=9, top_p=0.9, min_p=0.05),
     [dict(temperature=1.0, top_k=9, top_p=0.9, min_p=0.05), dict(temperature=0.8, top_k=9, min_p=0.05)]),
]


@pytest.mark.parametrize("case", range(len(DIST_CASES)))
def test_draws_follow_the_filtered_distribution(case):
    """20,000 draws (one seed, counters 0..19,999) against filter_probs(softmax(z / T)): Pearson's chi-square
    below its 1e-6 quantile; the same statistic for a sampler that ignores a parameter exceeds it."""
    right, wrongs = DIST_CASES[case]
    logits = make_logits(11, 1, DIST_V)[0] * 0.3
    expected = filter_probs(torch.softmax(logits / right["temperature"], 0), right.get("top_k", -1),
                            right.get("top_p", 1.0), right.get("min_p", 0.0))
    batch = logits.expand(DIST_N, DIST_V).contiguous()
    df = int((expected > 0).sum()) - 1
    bound = chi2_bound(df)

    def stat(kw) -> float:
        tokens = sample_batch(batch, make_params(DIST_N, seed=2024, counter=list(range(DIST_N)), **kw)).tokens
        return chi2_against(tokens, expected)

    assert df >= 3
    assert stat(right) < bound, f"{right}: chi2 {stat(right):.1f} ≥ {bound:.1f} (df {df}, seed 2024)"
    for wrong in wrongs:  # the test can fail
        assert stat(wrong) > bound, f"the test cannot tell {wrong} from {right}"


# --- (c) log-probabilities ---------------------------------------------------------------------------------
def test_logprobs_equal_token_logprobs():
    B, V, N = 9, 300, 7
    logits = make_logits(5, B, V)
    params = random_params(5, B, V)
    params.want_top_logprobs = N
    out = sample_batch(logits, params)
    for b in range(B):
        want = token_logprobs(logits[b], int(out.tokens[b]), N)
        assert abs(float(out.logprobs[b]) - want.logprob) < 1e-5, b
        assert tuple(out.top_ids[b].tolist()) == want.top_ids, b
        assert max(abs(x - y) for x, y in zip(out.top_logprobs[b].tolist(), want.top_logprobs, strict=True)) < 1e-5
    exact = torch.log_softmax(logits.double(), -1)  # from the raw logits, whatever the temperature or the ban
    assert (out.logprobs.double() - exact.gather(1, out.tokens[:, None])[:, 0]).abs().max() < 1e-5


@pytest.mark.parametrize("fn", [sample_batch, sample_batch_ref])
def test_token_ids_logprobs_are_the_raw_log_softmax_at_each_rows_ids(fn):
    """Rows name different numbers of ids (−1 padded; repeats kept), built by the scheduler's helper; the values
    come from the raw logits whatever the row's temperature or ban, and only the no-logprob rows lack them."""
    B, V = 4, 300
    logits = make_logits(8, B, V)
    eos, sampler = 299, Sampler(SamplingParams(), V)
    rows = [SamplingParams(temperature=0.9, token_ids_logprob=(3, 299, 3), min_new_tokens=2),
            SamplingParams(), SamplingParams(token_ids_logprob=(0,), logprobs=True), SamplingParams(temperature=0.5)]
    params = sampling_tensors([(p, sampler, 0, eos) for p in rows], "cpu")
    assert params.token_ids.tolist() == [[3, 299, 3], [-1, -1, -1], [0, -1, -1], [-1, -1, -1]]
    out = fn(logits, params)
    exact = torch.log_softmax(logits.double(), -1)
    for b, p in enumerate(rows):
        got = out.ids_logprobs[b, : len(p.token_ids_logprob)].double()
        assert torch.allclose(got, exact[b, list(p.token_ids_logprob)], rtol=0, atol=1e-6), b
    no_ids = sampling_tensors([(SamplingParams(logprobs=True), sampler, 0, eos)], "cpu")
    assert no_ids.token_ids is None and fn(logits[:1], no_ids).ids_logprobs is None


def test_top_logprobs_ties_take_the_lower_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0, 2.0]])
    out = sample_batch(logits, make_params(1, temperature=0.0, want_top_logprobs=5))
    assert out.top_ids.tolist() == [[1, 2, 4, 5, 6]]
    assert sample_batch_ref(logits, make_params(1, temperature=0.0, want_top_logprobs=5)).top_ids.tolist() == \
        [[1, 2, 4, 5, 6]]
    assert out.tokens.tolist() == [1]  # greedy: the first maximum


# --- (d) bans ----------------------------------------------------------------------------------------------
def test_banned_ids_are_never_drawn_and_greedy_takes_the_best_allowed():
    V, B = 300, 400
    row = make_logits(8, 1, V)[0]
    ranked = torch.argsort(row, descending=True).tolist()
    banned = ranked[:20]
    logits = row.expand(B, V).contiguous()
    ban = torch.tensor(banned + [-1, V + 4])[None].expand(B, 22)
    hot = sample_batch(logits, make_params(B, temperature=5.0, seed=3, counter=list(range(B)), ban_ids=ban))
    assert not set(hot.tokens.tolist()) & set(banned)
    assert len(set(hot.tokens.tolist())) > 20  # hot enough that the ban is what keeps those ids out
    greedy = sample_batch(logits[:2], make_params(2, temperature=[0.0, 0.7], top_k=[-1, 1], ban_ids=ban[:2]))
    assert greedy.tokens.tolist() == [ranked[20], ranked[20]]
    # −1 pads and ids outside the vocabulary ban nothing: the argmax stays
    padded = sample_batch(logits[:1], make_params(1, temperature=0.0, ban_ids=[[-1, V, -1]]))
    assert padded.tokens.tolist() == [ranked[0]]
    assert torch.isfinite(logits).all()  # the caller's logits are not modified


def test_scheduler_helper_bans_stop_ids_until_min_new_tokens():
    V, eos = 300, 2
    logits = torch.zeros(1, V)
    logits[0, eos], logits[0, 7] = 10.0, 9.0
    params = SamplingParams(min_new_tokens=2, stop_token_ids=(7,), top_logprobs=3)
    other = SamplingParams(temperature=0.5, top_k=4, top_p=0.5, min_p=0.1, seed=11)
    s, o = Sampler(params, V), Sampler(other, V)
    built = sampling_tensors([(params, s, 0, eos), (other, o, 5, eos), (params, s, 2, eos)], "cpu")
    assert built.ban_ids.tolist() == [[2, 7], [-1, -1], [-1, -1]]
    assert built.counter.tolist() == [0, 5, 2] and built.seed.tolist() == [s.seed, 11, s.seed]
    assert built.top_k.dtype == torch.int32 and built.top_k.tolist() == [-1, 4, -1]
    assert built.temperature.tolist() == [0.0, 0.5, 0.0] and built.want_top_logprobs == 3
    assert torch.equal(built.top_p, torch.tensor([1.0, 0.5, 1.0]))
    assert torch.equal(built.min_p, torch.tensor([0, 0.1, 0]))
    assert not built.all_greedy and built.uses_top_k_or_p
    out = sample_batch(logits.expand(3, V).contiguous(), built)
    assert out.tokens[0] not in (eos, 7) and out.tokens[2] == eos
    only_greedy = sampling_tensors([(params, s, 0, eos), (SamplingParams(temperature=2.0, top_k=1), s, 0, eos)], "cpu")
    assert only_greedy.all_greedy
    plain = sampling_tensors([(SamplingParams(temperature=0.5, min_p=0.1), s, 0, eos), (params, s, 0, eos),
                              (SamplingParams(top_p=0.5, top_k=9), s, 0, eos)], "cpu")  # the last two: greedy
    assert not plain.all_greedy and not plain.uses_top_k_or_p


# --- (e) outputs and inputs --------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [sample_batch, sample_batch_ref])
def test_out_buffers_are_fully_written(fn):
    B, V, N = 6, 40, 4
    logits = make_logits(4, B, V)
    params = random_params(4, B, V)
    params.want_top_logprobs = N
    params.token_ids = torch.tensor([[1, -1], [39, 2]] * 3)
    fresh = fn(logits, params)
    out = SampleOutput(torch.full((B,), -7, dtype=torch.int64), torch.full((B,), float("nan")),
                       torch.full((B, N), 12345, dtype=torch.int64), torch.full((B, N), float("nan")),
                       torch.full((B, 2), float("nan")))
    assert fn(logits, params, out=out) is out
    for name in ("tokens", "logprobs", "top_ids", "top_logprobs", "ids_logprobs"):
        assert torch.equal(getattr(out, name), getattr(fresh, name)), name


@pytest.mark.parametrize("field,value,match", [
    ("temperature", torch.ones(3, dtype=torch.float64), "params.temperature"),
    ("top_k", torch.ones(2, dtype=torch.int32), "params.top_k"),
    ("seed", torch.ones(3, dtype=torch.int32), "params.seed"),
    ("ban_ids", torch.ones(3, dtype=torch.int64), "params.ban_ids"),
    ("want_top_logprobs", 21, "want_top_logprobs"),
    ("token_ids", torch.ones(3, 2, dtype=torch.int32), "params.token_ids"),
])
def test_bad_inputs_raise_naming_the_field(field, value, match):
    params = make_params(3)
    setattr(params, field, value)
    with pytest.raises(ValueError, match=match):
        sample_batch(make_logits(0, 3, 30), params)
    with pytest.raises(ValueError, match="logits"):
        sample_batch(make_logits(0, 3, 30).double(), make_params(3))


# --- GPU ---------------------------------------------------------------------------------------------------
@gpu_only
@pytest.mark.parametrize("B,V", [(1, 17), (64, 129280)])
def test_cuda_equals_cpu(B, V):
    logits = make_logits(21, B, V)
    params = random_params(21, B, V)
    cuda_params = random_params(21, B, V, device="cuda")
    got, want = sample_batch(logits.cuda(), cuda_params), sample_batch(logits, params)
    bad = (got.tokens.cpu() != want.tokens).nonzero().flatten().tolist()
    assert not bad, f"B={B}, V={V}: rows {bad} cuda {got.tokens[bad].tolist()} cpu {want.tokens[bad].tolist()}"
    assert torch.equal(got.top_ids.cpu(), want.top_ids)
    # log-softmax over 129,280 fp32 logits: CPU and GPU sum in different orders; hold the GPU to the CPU's
    # own error against fp64
    exact = torch.log_softmax(logits.double(), -1)
    for name, ids in (("logprobs", want.tokens[:, None]), ("top_logprobs", want.top_ids)):
        truth = exact.gather(1, ids).reshape(getattr(want, name).shape)
        cpu_err = float((getattr(want, name).double() - truth).abs().max())
        gpu_err = float((getattr(got, name).cpu().double() - truth).abs().max())
        assert gpu_err <= 4 * cpu_err + 1e-6, f"{name}: GPU error {gpu_err:.2e}, CPU error {cpu_err:.2e}"


@gpu_only
def test_cuda_graph_capture_and_replay():
    B, V = 32, 129280
    logits = make_logits(31, B, V).cuda()
    params = random_params(31, B, V, device="cuda")
    static = SampleOutput(torch.empty(B, dtype=torch.int64, device="cuda"), torch.empty(B, device="cuda"),
                          torch.empty(B, 5, dtype=torch.int64, device="cuda"), torch.empty(B, 5, device="cuda"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: Triton compiles, the allocator settles
        sample_batch(logits, params, out=static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sample_batch(logits, params, out=static)
    for step in range(3):  # new inputs copied into the captured buffers
        new_logits, new_params = make_logits(40 + step, B, V).cuda(), random_params(40 + step, B, V, device="cuda")
        logits.copy_(new_logits)
        for name in ("temperature", "top_k", "top_p", "min_p", "seed", "counter", "ban_ids"):
            getattr(params, name).copy_(getattr(new_params, name))
        graph.replay()
        eager = sample_batch(new_logits, new_params)
        assert torch.equal(static.tokens, eager.tokens), step
        assert torch.equal(static.top_ids, eager.top_ids), step
        assert torch.equal(static.logprobs, eager.logprobs), step


@gpu_only
def test_scheduler_helper_on_cuda_matches_the_sampler():
    V = 1000
    params = SamplingParams(temperature=0.7, top_k=40, seed=8)
    rows = [make_logits(60 + i, 1, V)[0] for i in range(5)]
    sampler = Sampler(params, V)
    on_cpu = [sampler.sample(row) for row in rows]
    built = [sampling_tensors([(params, sampler, i, 0)], "cuda") for i in range(5)]
    on_gpu = [int(sample_batch(rows[i][None].cuda(), built[i]).tokens[0]) for i in range(5)]
    assert on_gpu == on_cpu
