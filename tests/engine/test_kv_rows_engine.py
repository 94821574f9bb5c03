"""The main KV cache's row format in the engine (kernels/kv_rows.py, engine/pools.py): FP8 KV rows when the model
rounds its KV to FP8, float rows otherwise, through one code path; greedy tokens equal the single-process
reference either way; the `bench` preset's shipped state at 32K shrinks below 0.7× its bf16 size."""

from __future__ import annotations

import pytest
import torch

from sparsepd.engine.engine import Engine
from sparsepd.engine.generate import generate
from sparsepd.engine.pools import KVPools, PoolConfig, kv_row_layout, plan_geometry
from sparsepd.engine.sampling import SamplingParams
from sparsepd.engine.state_io import expected_specs, export_state, import_state, shipped_bytes
from sparsepd.kernels.kv_rows import unpack_kv_rows
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset

BF16_STATE_AT_32K = 20_611_072  # the `bench` preset's state per request at 32K with bf16 rows (bench/RESULTS.md)
GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)


def _spec_bytes(pools: KVPools, num_pages: int) -> int:
    return sum(torch.Size(s.shape).numel() * torch.empty(0, dtype=getattr(torch, s.dtype)).element_size()
               for s in expected_specs(pools, num_pages))


@pytest.mark.parametrize("quantize_kv", [True, False])
def test_bench_state_at_32k_from_the_pool_layout(quantize_kv):
    cfg = get_preset("bench", quantize_kv=quantize_kv)
    context = 32768
    num_pages = context // cfg.page_size
    pools = KVPools(cfg, plan_geometry(cfg, PoolConfig(num_slots=1, max_batch_tokens=16, num_pages=num_pages),
                                       torch.device("cpu")), "cpu")
    state = _spec_bytes(pools, num_pages)  # what an export at 32K copies out of these pools and ships
    assert state == shipped_bytes(cfg, context)
    if quantize_kv:
        assert pools.kv[0].dtype == torch.uint8 and pools.kv[0].shape[1] == 584
        assert state < 0.7 * BF16_STATE_AT_32K, state
    else:
        assert pools.kv[0].dtype == torch.bfloat16 and pools.kv[0].shape[1] == cfg.head_dim
        assert state == BF16_STATE_AT_32K


@pytest.fixture(scope="module", params=[True, False], ids=["fp8-rows", "float-rows"])
def model(request):
    return build_model(get_preset("tiny", quantize_kv=request.param), seed=0)


def test_greedy_tokens_equal_the_reference_with_either_row_format(model):
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 17, 40)]
    want = [generate(model, p, GREEDY).output_ids for p in prompts]
    engine = Engine(model, PoolConfig(num_slots=4, max_batch_tokens=32, num_pages=24))
    layout = kv_row_layout(model.cfg)
    assert (engine.pools.kv_layout is None) == (not model.cfg.quantize_kv) and engine.pools.kv_layout == layout
    got = engine.generate(prompts, GREEDY)
    assert [r.output_ids for r in got] == want
    assert engine.is_idle_and_empty()


def test_fp8_rows_hold_the_numbers_of_float_rows():
    """The same requests through an FP8-row engine and a float-row engine of the same (FP8-rounding) model:
    every SWA ring and committed compressed row holds the same numbers, bit for bit."""
    model = build_model(get_preset("tiny"), seed=0)
    prompt = torch.randint(0, 256, (37,), generator=torch.Generator().manual_seed(8)).tolist()
    states = []
    for rows in ("fp8", "float"):
        engine = Engine(model, PoolConfig(num_slots=2, max_batch_tokens=32, num_pages=8))
        if rows == "float":  # the same model, its pools forced to float rows
            engine.pools.kv_layout = None
            engine.pools.kv = [torch.zeros(t.shape[0], model.cfg.head_dim, dtype=torch.float32)
                               for t in engine.pools.kv]
        request = engine.submit(prompt, SamplingParams(max_new_tokens=3, ignore_eos=True))
        while len(request.output_ids) < 2:
            engine.step()
        states.append((engine.pools, export_state(engine.pools, request)[1]))
    (fp8_pools, fp8_state), (_, float_state) = states
    assert fp8_state.keys() == float_state.keys()
    for name, t in fp8_state.items():
        if name.endswith(".swa") or name.endswith(".kv_compressed"):
            assert t.dtype == torch.uint8
            values = unpack_kv_rows(t, fp8_pools.kv_layout)
            assert torch.equal(values.view(torch.int32), float_state[name].view(torch.int32)), name
        else:
            assert torch.equal(t, float_state[name]), name


def test_a_state_of_the_other_row_format_is_refused():
    fp8 = Engine(build_model(get_preset("tiny"), seed=0), PoolConfig(num_slots=2, max_batch_tokens=32, num_pages=8))
    flt = Engine(build_model(get_preset("tiny", quantize_kv=False), seed=0),
                 PoolConfig(num_slots=2, max_batch_tokens=32, num_pages=8))
    request = fp8.submit(list(range(20)), SamplingParams(max_new_tokens=2, ignore_eos=True))
    while not request.output_ids:
        fp8.step()
    descriptor, tensors = export_state(fp8.pools, request)
    target = flt.make_request(list(range(20)), SamplingParams(max_new_tokens=2, ignore_eos=True))
    flt.scheduler.admit(target)
    with pytest.raises(ValueError, match="state tensors do not match this engine: shape/dtype"):
        import_state(flt.pools, target, descriptor, tensors)
