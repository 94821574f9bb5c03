"""Batched sampling on the device: one call draws the next token of every row of a batch.

For row b with raw logits z [V] (fp32), banned ids ban_ids[b] (−1 padded) and its parameters:

    z⁺    = z + bias − frequency·count − presence·[count > 0]      (`apply_penalties`, rows that use them)
    z⁺    = z⁺ / repetition if z⁺ > 0 else z⁺ · repetition  where the id is in the prompt or count > 0
    greedy (temperature < SAMPLING_EPS or top_k == 1):  t = 1, else t = temperature
    z'    = finite(z⁺ / t) with z'[banned] = −inf (the ban after the scaling; a row all banned keeps none of
            its ban), and z'[i] = −inf where the row's grammar mask clears bit i; when the grammar allows only
            banned ids, the ban is dropped: z' = finite(z⁺ / t) masked by the grammar alone
            (`apply_token_bitmask`; engine/grammar.py explains the rule)
    greedy:  token = argmax z'                                                    (first index on ties)
    else:    p = softmax(z');  keep = top-k ∩ top-p ∩ min-p of p, never empty     (`filter_probs`)
           token = argmax_{i ∈ keep} p_i / E_i,   E_i = −log(1 − w_i),   w_i = (h(seed, counter, i) + ½) / 2³²
                                                  (w and the log in fp64, E rounded to fp32)

The exponential race: for i.i.d. E_i ~ Exp(1), argmax p_i / E_i is distributed as Categorical(p / Σ p), so
the filtered probabilities need no renormalisation. h is a 32-bit hash of the token id keyed by
(seed, counter), counter being the index of the token being drawn (the request's output length so far):
a request's draws depend on its seed, its position and its logits only, not on the batch, the row, the
device or the process. h is two rounds of lowbias32 (a 32-bit bijection) keyed by two 32-bit row keys,
themselves two chains of lowbias32 over the seed's and the counter's 32-bit halves. The Triton kernel
computes it in uint32 (wrapping by definition); the PyTorch reference on int64 tensors holding 32-bit
values, where every product stays below 2⁶³ and right shifts see non-negative values only: no signed
overflow, the same bits on every device (a test checks both against Python integers).

Penalties follow SGLang (the version that had all four): count = the id's occurrences among the row's
GENERATED tokens; logit_bias, then the additive frequency/presence penalties, then the multiplicative
repetition penalty (HF/CTRL form) over prompt + generated ids, all before the ban and the temperature.
The engine keeps count and the prompt mask per slot on the device (engine/penalties.py).

Also returned, from the RAW logits (before the ban, temperature and filters): logprobs[b] =
log_softmax(z)[token] and the N best ids of log_softmax(z) with their values (ties: lower id first,
through kernels/topk.py: Triton on GPU tensors, a stable sort on CPU tensors), and when rows name token ids
(`token_ids`, SGLang's token_ids_logprob) log_softmax(z) at those ids.

No host synchronization: fixed-shape tensor ops and launches only, so a step can be captured in a CUDA
graph and costs one async copy of the outputs. The random stream is one Triton kernel (`exponentials`);
the rest is PyTorch vectorized over the batch (one stable sort per row serves top-k, top-p and min-p).
`sample_batch_ref` loops over rows with the per-request logic; `exponentials_ref` is the stream in PyTorch.

Limits: w has 32 bits, so E ∈ [1.2e-10, 22.9]: a kept token whose p is below ~1e-10 of the winning p/E
cannot win (a bias below V·1e-10 of probability mass). Results on CPU and GPU are equal except where two
candidates' p/E lie within rounding of each other (softmax, cumsum and log differ in the last bits).

No parameter or logit value makes NaN: temperatures below SAMPLING_EPS (SGLang's bound, 1e-6) are greedy,
infinite or NaN ones are clamped to fp32's largest value or taken as greedy (the edge refuses them; this is
the last line of defence); finite(x) maps +inf (a huge logit over a tiny temperature, or a repetition
penalty dividing a positive logit by a tiny value) to fp32's largest value and NaN to −inf; a row whose
every token is banned draws as if nothing were (the ban is lifted, never a NaN softmax); the most likely
token is always kept, whatever top-p or min-p say. A row whose logits are all NaN or −inf, or whose grammar
mask allows nothing, gives an unspecified token (the engine's grammar matcher then rejects it and fails that
request alone).

Cost (H200, V = 129,280, mixed parameters, 2026-11-30): B = 1: 261 µs in a CUDA graph (1.2 ms eager, launch
bound); B = 64: 1.6 ms; B = 256: 5.0 ms, of which the stable sort is 2.4 ms and the rest of the top-k/top-p
mask 1.3 ms, the random stream 0.13 ms. The host-side promises cut B = 256 to 0.72 ms (all greedy) and
1.5 ms (no top-k/top-p, no sort). A sort-free top-k/top-p (threshold search as in kernels/topk.py) is next.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sparsepd.kernels.device import Backend, pick_backend
from sparsepd.kernels.topk import topk_visible
from sparsepd.sampling_params import MAX_TOP_LOGPROBS, SAMPLING_EPS  # the parameters' definition (the floor)

_FP32_MAX = torch.finfo(torch.float32).max
_M32 = 0xFFFFFFFF


@dataclass(slots=True)
class SamplingTensors:
    """Per-row sampling parameters, all on the logits' device (build them with engine.sampling)."""

    temperature: torch.Tensor  # [B] fp32, < SAMPLING_EPS = greedy
    top_k: torch.Tensor  # [B] int32, ≤ 0 = all tokens
    top_p: torch.Tensor  # [B] fp32 in (0, 1]
    min_p: torch.Tensor  # [B] fp32 in [0, 1)
    seed: torch.Tensor  # [B] int64
    counter: torch.Tensor  # [B] int64: index of the token being drawn
    ban_ids: torch.Tensor  # [B, M] int64, −1 padded
    # Structured output: bit i % 32 of word i // 32 set = token id i allowed (xgrammar's layout); a row without
    # a grammar is all ones (−1). None: no row has a grammar.
    token_bitmask: torch.Tensor | None = None  # [B, ⌈V/32⌉] int32
    want_top_logprobs: int = 0  # N, the most any row wants (≤ MAX_TOP_LOGPROBS)
    penalties: PenaltyTensors | None = None  # None: no row uses penalties or a logit bias
    # Host-side promises that skip work (static per CUDA graph): every row is greedy (argmax only); no
    # sampled row uses top-k > 1 or top-p < 1 (no sort). The defaults promise nothing.
    all_greedy: bool = False
    uses_top_k_or_p: bool = True
    token_ids: torch.Tensor | None = None  # [B, K] int64, −1 padded: ids whose log-probabilities to report


@dataclass(slots=True)
class PenaltyTensors:
    """Per-row penalties and logit bias on the logits' device; a row without them has 0, 0, 1 and no bias
    (which leaves its logits bit for bit). counts/prompt_mask are None when no row uses a penalty."""

    frequency: torch.Tensor  # [B] fp32
    presence: torch.Tensor  # [B] fp32
    repetition: torch.Tensor  # [B] fp32, 1 = off
    bias_ids: torch.Tensor  # [B, K] int64, −1 padded
    bias_values: torch.Tensor  # [B, K] fp32
    counts: torch.Tensor | None = None  # [B, V] int32: occurrences of each id among the generated tokens
    prompt_mask: torch.Tensor | None = None  # [B, V] bool: the id is in the prompt


@dataclass(slots=True)
class SampleOutput:
    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] fp32: log_softmax(raw logits)[token]
    top_ids: torch.Tensor  # [B, N] int64
    top_logprobs: torch.Tensor  # [B, N] fp32
    ids_logprobs: torch.Tensor | None = None  # [B, K] fp32: log_softmax(raw logits) at params.token_ids (pads: junk)


# --- the counter-based random stream --------------------------------------------------------------
@triton.jit
def _mix32_tl(x):
    x = x ^ (x >> 16)
    x = x * _MIX0
    x = x ^ (x >> 15)
    x = x * _MIX1
    return x ^ (x >> 16)


@triton.jit
def _exponentials_kernel(seed_ptr, counter_ptr, out_ptr, V, out_stride, BLOCK: tl.constexpr):
    """One program per (row, block of token ids): the row keys (cheap scalars), then E for the block."""
    row = tl.program_id(0).to(tl.int64)
    seed = tl.load(seed_ptr + row)
    counter = tl.load(counter_ptr + row)
    words = (seed.to(tl.uint32), (seed >> 32).to(tl.uint32), counter.to(tl.uint32), (counter >> 32).to(tl.uint32))
    k1 = tl.full((), _KEY0, tl.uint32)
    k2 = tl.full((), _KEY1, tl.uint32)
    for i in tl.static_range(4):
        k1 = _mix32_tl(k1 ^ words[i])
        k2 = _mix32_tl(k2 ^ words[i])
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    x = _mix32_tl(_mix32_tl(cols.to(tl.uint32) ^ k1) ^ k2)
    w = (x.to(tl.float64) + 0.5) * 2.3283064365386963e-10  # 2^-32; exact in fp64, as is 1 - w
    tl.store(out_ptr + row * out_stride + cols, (-tl.log(1.0 - w)).to(tl.float32), mask=cols < V)


_MIX0 = tl.constexpr(0x7FEB352D)  # lowbias32's multipliers (shifts 16, 15, 16): a 32-bit bijection
_MIX1 = tl.constexpr(0x846CA68B)
_KEY0 = tl.constexpr(0x2545F491)  # the initial values of the two key chains (k1, k2)
_KEY1 = tl.constexpr(0x9E3779B9)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x · c mod 2³² for x in [0, 2³²): c's top bit is added as (x & 1) << 31, so x · c stays < 2⁶³."""
    y = (x * (c & 0x7FFFFFFF)) & _M32
    return (y + ((x & 1) << 31)) & _M32 if c >> 31 else y


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, int(_MIX0.value))
    x = x ^ (x >> 15)
    x = _mul32(x, int(_MIX1.value))
    return x ^ (x >> 16)


def random_bits(seed: torch.Tensor, counter: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """h(seed[b], counter[b], i) for every token id i: int64 in [0, 2³²), [B, V] (plain PyTorch)."""
    seed, counter = seed.long(), counter.long()
    words = (seed & _M32, (seed >> 32) & _M32, counter & _M32, (counter >> 32) & _M32)
    keys = []
    for init in (_KEY0.value, _KEY1.value):  # two chains: rows collide only if both keys do
        k = torch.full_like(seed, init)
        for w in words:
            k = _mix32(k ^ w)
        keys.append(k[:, None])
    ids = torch.arange(vocab_size, dtype=torch.int64, device=seed.device)
    return _mix32(_mix32(ids[None, :] ^ keys[0]) ^ keys[1])


def exponentials_ref(seed: torch.Tensor, counter: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """E = −log(1 − w) ~ Exp(1) per (row, token id), fp32 [B, V]; w = (h + ½) / 2³², both in fp64."""
    w = (random_bits(seed, counter, vocab_size).double() + 0.5) * 2.0**-32
    return torch.log1p(-w).neg_().float()


def exponentials(seed: torch.Tensor, counter: torch.Tensor, vocab_size: int, *,
                 backend: Backend = "auto") -> torch.Tensor:
    """`exponentials_ref` in one Triton pass (≈ 35 int64 passes over [B, V] and ~120 tiny launches less)."""
    if pick_backend(backend, seed, counter) == "reference":
        return exponentials_ref(seed, counter, vocab_size)
    B = seed.shape[0]
    out = torch.empty((B, vocab_size), dtype=torch.float32, device=seed.device)  # [B, V]
    if B and vocab_size:
        _exponentials_kernel[(B, triton.cdiv(vocab_size, _BLOCK))](
            seed.long().contiguous(), counter.long().contiguous(), out, vocab_size, out.stride(0), BLOCK=_BLOCK,
            num_warps=4)  # the kernel reads seed[row], counter[row] at unit stride: columns of a table are not
    return out


_BLOCK = 1024


# --- the filters ----------------------------------------------------------------------------------
def filter_probs(probs: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """One row `[V]`: zero the tokens outside top-k, outside the top-p nucleus, below min_p · max; renormalise.

    top-k keeps probs ≥ the k-th largest (ties kept); top-p keeps tokens whose mass ranked above (descending,
    equal probs lower id first) is < top_p (and the first always); min-p keeps probs ≥ min_p · max.
    """
    if top_k > 0:
        kth = torch.topk(probs, min(top_k, probs.shape[-1])).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True, stable=True)
        before = torch.cumsum(sorted_p, 0) - sorted_p  # mass of the tokens ranked above
        keep_sorted = before < top_p
        keep_sorted[0] = True  # the most likely token stays, even for a top_p that rounds to 0
        keep = torch.zeros_like(keep_sorted).scatter(0, order, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
    if min_p > 0.0:
        probs = torch.where(probs >= min_p * probs.max(), probs, 0.0)
    return probs / probs.sum()


def _keep_mask(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """`filter_probs`'s kept set for every row at once, bool [B, V], from one stable sort per row."""
    V = probs.shape[1]
    sorted_p, order = torch.sort(probs, dim=1, descending=True, stable=True)  # [B, V]
    k = torch.where(top_k > 0, top_k.long().clamp(max=V), V)  # [B]; all tokens: the k-th is the smallest
    in_top_k = sorted_p >= sorted_p.gather(1, (k - 1)[:, None])
    kept = torch.where(in_top_k, sorted_p, 0.0)  # top-k keeps a prefix of the sorted order
    before = kept.cumsum(1) - kept
    keep_sorted = in_top_k & ((before < top_p[:, None]) | (top_p[:, None] >= 1.0))
    keep_sorted[:, 0] = True  # the most likely token, whatever a top-p that rounds to 0 in fp32 says
    keep = torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)
    return keep & ((probs >= min_p[:, None] * sorted_p[:, :1]) | (probs == sorted_p[:, :1]))


# --- grammar masks --------------------------------------------------------------------------------
def unpack_token_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [B, V]: id i allowed where bit i % 32 of word i // 32 is set (int32 words; >> is arithmetic, so the
    sign bit reads as bit 31)."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask[:, :, None] >> bits) & 1).bool().reshape(bitmask.shape[0], -1)[:, :vocab_size]


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits `[B, V]` with every id the bitmask `[B, ⌈V/32⌉]` int32 does not allow set to −inf (a new tensor;
    the others unchanged bit for bit). Vectorized, no host sync; any device."""
    B, V = logits.shape
    if bitmask.dtype != torch.int32 or tuple(bitmask.shape) != (B, (V + 31) // 32) or bitmask.device != logits.device:
        raise ValueError(f"token bitmask: expected int32 [{B}, {(V + 31) // 32}] on {logits.device}, got "
                         f"{bitmask.dtype} {list(bitmask.shape)} on {bitmask.device}")
    return logits.masked_fill(~unpack_token_bitmask(bitmask, V), float("-inf"))


def apply_token_bitmask_ref(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """The same id by id from Python integers (for the tests)."""
    out = logits.clone()
    words = bitmask.tolist()
    for b in range(logits.shape[0]):
        for i in range(logits.shape[1]):
            if not (words[b][i // 32] >> (i % 32)) & 1:
                out[b, i] = float("-inf")
    return out


def _mask(scaled: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """The module doc's z' from finite(z⁺ / t): bans and the grammar mask, the grammar alone where both together
    leave nothing."""
    banned = _banned(scaled, params.ban_ids)
    if params.token_bitmask is None:
        return banned
    both = apply_token_bitmask(banned, params.token_bitmask)
    nothing_left = torch.isneginf(both).all(dim=1, keepdim=True)  # [B, 1]
    return torch.where(nothing_left, apply_token_bitmask(scaled, params.token_bitmask), both)


# --- penalties and logit bias --------------------------------------------------------------------
def apply_penalties(logits: torch.Tensor, pen: PenaltyTensors) -> torch.Tensor:
    """The module doc's z⁺ for every row at once (a new tensor; vectorized, no host sync)."""
    B, V = logits.shape
    idx = torch.where((pen.bias_ids >= 0) & (pen.bias_ids < V), pen.bias_ids, V)
    bias = torch.zeros((B, V + 1), dtype=torch.float32, device=logits.device)
    z = logits + bias.scatter_add_(1, idx, pen.bias_values)[:, :V]
    if pen.counts is None:
        return z
    generated = pen.counts > 0
    z = z - pen.frequency[:, None] * pen.counts - pen.presence[:, None] * generated
    rep = pen.repetition[:, None]
    return torch.where(generated | pen.prompt_mask, torch.where(z > 0, z / rep, z * rep), z)


def apply_penalties_row(logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int], frequency: float,
                        presence: float, repetition: float, bias: dict[int, float]) -> torch.Tensor:
    """The same for one row `[V]` fp32 from its token history, id by id (the reference; fp32 scalars, so the
    arithmetic is the batched one's, operation for operation)."""
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    z = logits.float().clone()
    for i, b in bias.items():
        z[i] = z[i] + f32(b)
    counts: dict[int, int] = {}
    for t in output_ids:
        counts[t] = counts.get(t, 0) + 1
    for t, n in counts.items():
        z[t] = (z[t] - f32(frequency) * n) - f32(presence)
    for t in {*prompt_ids, *output_ids}:
        z[t] = z[t] / f32(repetition) if z[t] > 0 else z[t] * f32(repetition)
    return z


# --- the batched sampler --------------------------------------------------------------------------
def _check(logits: torch.Tensor, params: SamplingTensors, out: SampleOutput | None) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be a float32 [B, V] tensor, got {getattr(logits, 'dtype', type(logits))} "
                         f"{list(getattr(logits, 'shape', ()))}")
    B, V = logits.shape
    fields = {"temperature": torch.float32, "top_k": torch.int32, "top_p": torch.float32,
              "min_p": torch.float32, "seed": torch.int64, "counter": torch.int64}
    for name, dtype in fields.items():
        t = getattr(params, name)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B,) or t.dtype != dtype or t.device != logits.device:
            raise ValueError(f"params.{name}: expected {dtype} [{B}] on {logits.device}, got "
                             f"{getattr(t, 'dtype', type(t))} {list(getattr(t, 'shape', ()))} "
                             f"on {getattr(t, 'device', None)}")
    for name in ("all_greedy", "uses_top_k_or_p"):
        if not isinstance(getattr(params, name), bool):
            raise ValueError(f"params.{name}: expected a bool, got {getattr(params, name)!r}")
    ban = params.ban_ids
    if (not isinstance(ban, torch.Tensor) or ban.dim() != 2 or ban.shape[0] != B or ban.dtype != torch.int64
            or ban.device != logits.device):
        raise ValueError(f"params.ban_ids: expected int64 [{B}, M] on {logits.device}, got "
                         f"{getattr(ban, 'dtype', type(ban))} {list(getattr(ban, 'shape', ()))}")
    if params.penalties is not None:
        _check_penalties(params.penalties, B, V, logits.device)
    ids = params.token_ids
    if ids is not None and (not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != B
                            or ids.dtype != torch.int64 or ids.device != logits.device):
        raise ValueError(f"params.token_ids: expected int64 [{B}, K] (−1 padded) on {logits.device}, got "
                         f"{getattr(ids, 'dtype', type(ids))} {list(getattr(ids, 'shape', ()))}")
    mask = params.token_bitmask
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.int32
                             or tuple(mask.shape) != (B, (V + 31) // 32) or mask.device != logits.device):
        raise ValueError(f"params.token_bitmask: expected int32 [{B}, {(V + 31) // 32}] on {logits.device}, got "
                         f"{getattr(mask, 'dtype', type(mask))} {list(getattr(mask, 'shape', ()))}")
    n = params.want_top_logprobs
    if not isinstance(n, int) or not 0 <= n <= min(MAX_TOP_LOGPROBS, V):
        raise ValueError(f"params.want_top_logprobs: expected an int in [0, {min(MAX_TOP_LOGPROBS, V)}], got {n!r}")
    if out is not None:
        want = {"tokens": (torch.int64, (B,)), "logprobs": (torch.float32, (B,)),
                "top_ids": (torch.int64, (B, n)), "top_logprobs": (torch.float32, (B, n))}
        if ids is not None:
            want["ids_logprobs"] = (torch.float32, tuple(ids.shape))
        for name, (dtype, shape) in want.items():
            t = getattr(out, name)
            if t is None or tuple(t.shape) != shape or t.dtype != dtype or t.device != logits.device:
                raise ValueError(f"out.{name}: expected {dtype} {list(shape)} on {logits.device}, got "
                                 f"{getattr(t, 'dtype', None)} {list(getattr(t, 'shape', ()))} "
                                 f"on {getattr(t, 'device', None)}")


def _check_penalties(pen: PenaltyTensors, B: int, V: int, device: torch.device) -> None:
    K = pen.bias_ids.shape[-1] if isinstance(pen.bias_ids, torch.Tensor) else -1
    want = {"frequency": (torch.float32, (B,)), "presence": (torch.float32, (B,)),
            "repetition": (torch.float32, (B,)), "bias_ids": (torch.int64, (B, K)),
            "bias_values": (torch.float32, (B, K))}
    if (pen.counts is None) != (pen.prompt_mask is None):
        raise ValueError("params.penalties: counts and prompt_mask must be given together")
    if pen.counts is not None:
        want |= {"counts": (torch.int32, (B, V)), "prompt_mask": (torch.bool, (B, V))}
    for name, (dtype, shape) in want.items():
        t = getattr(pen, name)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype or t.device != device:
            raise ValueError(f"params.penalties.{name}: expected {dtype} {list(shape)} on {device}, got "
                             f"{getattr(t, 'dtype', type(t))} {list(getattr(t, 'shape', ()))} "
                             f"on {getattr(t, 'device', None)}")


def _banned(logits: torch.Tensor, ban_ids: torch.Tensor) -> torch.Tensor:
    """logits with ban_ids set to −inf (ids outside [0, V) ignored: they pad into a spare column); a row
    whose every token would be banned keeps its logits (nothing to draw from is never the answer)."""
    B, V = logits.shape
    idx = torch.where((ban_ids >= 0) & (ban_ids < V), ban_ids, V)
    mask = torch.zeros((B, V + 1), dtype=torch.bool, device=logits.device).scatter_(1, idx, True)
    masked = logits.masked_fill(mask[:, :V], float("-inf"))
    return torch.where((masked > float("-inf")).any(1, keepdim=True), masked, logits)


def _finite(x: torch.Tensor) -> torch.Tensor:
    """The module doc's finite(): +inf → fp32's largest value, NaN → −inf."""
    return torch.nan_to_num(x, nan=float("-inf"), posinf=_FP32_MAX, neginf=float("-inf"))


def _scaled(logits: torch.Tensor, temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(finite(logits / t), greedy) with the module doc's t: no NaN, no +inf, whatever the inputs."""
    greedy = ~(temperature >= SAMPLING_EPS)  # NaN: greedy
    t = torch.where(greedy, 1.0, temperature.clamp(max=_FP32_MAX))[:, None]
    return _finite(logits / t), greedy


def _finish(logits: torch.Tensor, tokens: torch.Tensor, n: int, token_ids: torch.Tensor | None,
            out: SampleOutput | None, backend: Backend) -> SampleOutput:
    """The raw log-softmax at the tokens, its top n and at token_ids, written into `out` when given."""
    logp = torch.log_softmax(logits, dim=1)  # [B, V]
    ids_logprobs = None if token_ids is None else logp.gather(1, token_ids.clamp(min=0))  # [B, K]
    logprobs = logp.gather(1, tokens[:, None])[:, 0]
    B = logits.shape[0]
    if n > 0:
        visible = torch.full((B,), logits.shape[1], dtype=torch.int32, device=logits.device)
        top_ids = topk_visible(logp, visible, n, backend=backend).long()  # [B, n], ties: lower id first
        top_logprobs = logp.gather(1, top_ids)
    else:
        top_ids = torch.empty((B, 0), dtype=torch.int64, device=logits.device)
        top_logprobs = torch.empty((B, 0), dtype=torch.float32, device=logits.device)
    if out is None:
        return SampleOutput(tokens, logprobs, top_ids, top_logprobs, ids_logprobs)
    out.tokens.copy_(tokens)
    out.logprobs.copy_(logprobs)
    out.top_ids.copy_(top_ids)
    out.top_logprobs.copy_(top_logprobs)
    if ids_logprobs is not None:
        out.ids_logprobs.copy_(ids_logprobs)
    return out


def sample_batch(logits: torch.Tensor, params: SamplingTensors, *, out: SampleOutput | None = None,
                 backend: Backend = "auto") -> SampleOutput:
    """Draw one token per row of `logits` [B, V] fp32 (module doc); no host synchronization."""
    _check(logits, params, out)
    B, V = logits.shape
    penalized = logits if params.penalties is None else apply_penalties(logits, params.penalties)
    if params.all_greedy:  # t = 1: no division
        return _finish(logits, _mask(_finite(penalized), params).argmax(1), params.want_top_logprobs,
                       params.token_ids, out, backend)
    scaled, greedy = _scaled(penalized, params.temperature)
    greedy = greedy | (params.top_k == 1)  # [B]
    masked = _mask(scaled, params)
    probs = torch.softmax(masked, dim=1).nan_to_num_(nan=0.0)  # [B, V]; NaN only where a row is all −inf
    if params.uses_top_k_or_p:
        keep = _keep_mask(probs, params.top_k, params.top_p, params.min_p)
    else:  # what _keep_mask reduces to without top-k and top-p
        top = probs.amax(1, keepdim=True)
        keep = (probs >= params.min_p[:, None] * top) | (probs == top)
    race = torch.where(keep, probs / exponentials(params.seed, params.counter, V, backend=backend), -1.0)
    tokens = torch.where(greedy, masked.argmax(1), race.argmax(1))
    return _finish(logits, tokens, params.want_top_logprobs, params.token_ids, out, backend)


def sample_batch_ref(logits: torch.Tensor, params: SamplingTensors, *,
                     out: SampleOutput | None = None) -> SampleOutput:
    """Row by row with the per-request definitions (`filter_probs`, renormalised), for the tests."""
    _check(logits, params, out)
    B, V = logits.shape
    tokens = []
    penalized = logits if params.penalties is None else apply_penalties(logits, params.penalties)
    for b in range(B):
        t = float(params.temperature[b])
        greedy = not t >= SAMPLING_EPS or int(params.top_k[b]) == 1
        scaled = _finite(penalized[b] / (1.0 if greedy else min(t, _FP32_MAX)))
        z = scaled.clone()
        z[[i for i in params.ban_ids[b].tolist() if 0 <= i < V]] = float("-inf")
        z = z if bool((z > float("-inf")).any()) else scaled  # all banned: the ban is lifted
        if params.token_bitmask is not None:
            allowed = apply_token_bitmask_ref(scaled[None], params.token_bitmask[b: b + 1])[0]
            z = torch.where(torch.isneginf(allowed), float("-inf"), z)
            if bool(torch.isneginf(z).all()):  # the grammar allows only banned ids: it wins
                z = allowed
        if greedy:
            tokens.append(int(torch.argmax(z)))
            continue
        probs = torch.softmax(z, dim=0).nan_to_num(nan=0.0)
        probs = filter_probs(probs, int(params.top_k[b]), float(params.top_p[b]), float(params.min_p[b]))
        e = exponentials_ref(params.seed[b : b + 1], params.counter[b : b + 1], V)[0]
        tokens.append(int(torch.argmax(probs / e)))
    tokens_t = torch.tensor(tokens, dtype=torch.int64, device=logits.device)
    n = params.want_top_logprobs
    logp = torch.log_softmax(logits, dim=1)
    top_ids = torch.sort(logp, dim=1, descending=True, stable=True).indices[:, :n]
    ids = params.token_ids
    ids_logprobs = None if ids is None else logp.gather(1, ids.clamp(min=0))
    result = SampleOutput(tokens_t, logp.gather(1, tokens_t[:, None])[:, 0], top_ids, logp.gather(1, top_ids),
                          ids_logprobs)
    if out is None:
        return result
    for name in ("tokens", "logprobs", "top_ids", "top_logprobs", "ids_logprobs"):
        if getattr(result, name) is not None:
            getattr(out, name).copy_(getattr(result, name))
    return out
