"""The Triton kernels inside the engine, on the CPU: with SPARSEPD_FORCE_TRITON=1 under TRITON_INTERPRET=1,
every kernel wrapper's "auto" picks Triton for CPU tensors (kernels/device.py), so the `tiny` engine runs its
forward (norms, compressors, indexer, top-k, the selected entries' rows, sparse attention, state writes,
hyper-connections, MoE with its gate and shared expert) and its draw through the kernels in the interpreter, as
it does on a GPU. Its tokens (greedy, and seeded: the random stream's kernel) must equal those of the same engine
on the PyTorch references, and every kernel module the engine calls must have resolved to Triton. (A greedy draw
is an argmax in PyTorch on both; the kernels of rope_norm and attn_merge are reached through those above, not
through a wrapper of their own.)"""

from __future__ import annotations

import sys
from collections import Counter

import pytest

from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.kernels.device import triton_interpreting
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset

# The kernel modules a tiny engine's prefill, decode and draw call through a wrapper (kv_rows: its KV rows are FP8).
ENGINE_KERNELS = {"compressor", "entry_rows", "hyper", "indexer", "kv_rows", "moe", "rms_norm", "routing", "sampling",
                  "sparse_attention", "state_update", "swiglu", "topk"}


def _record_backends(monkeypatch) -> Counter:
    """Count, per kernel module, the backends its wrappers resolved to."""
    from sparsepd.kernels.device import pick_backend

    seen: Counter = Counter()

    def recorder(short: str):
        def recording(backend, *tensors):
            chosen = pick_backend(backend, *tensors)
            seen[(short, chosen)] += 1
            return chosen
        return recording

    for name, module in list(sys.modules.items()):
        if (name.startswith("sparsepd.kernels.") and name != "sparsepd.kernels.device"
                and getattr(module, "pick_backend", None) is pick_backend):
            monkeypatch.setattr(module, "pick_backend", recorder(name.rsplit(".", 1)[1]))
    return seen


def _tokens(model, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    engine = Engine(model, PoolConfig(num_slots=len(prompts), max_batch_tokens=32, num_pages=12))
    requests = [engine.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
    engine.scheduler.run_to_completion()
    assert engine.is_idle_and_empty()
    return [r.output_ids for r in requests]


@pytest.mark.skipif(not triton_interpreting(), reason="runs the kernels in the Triton interpreter (CPU only)")
def test_the_tiny_engine_on_triton_kernels_gives_the_reference_engines_tokens(monkeypatch):
    model = build_model(get_preset("tiny"), seed=0)
    # three requests batched: 12, 21 and 9 prompt tokens (prefilled in chunks of the 32-token budget, past CSA
    # boundaries: ratio 4), then 3 decode steps each; two greedy, one seeded (the random stream's kernel)
    prompts = [list(range(65, 77)), [256, *b"sparse attention, batched"[:20]], list(b"a seeded")]
    greedy = SamplingParams(max_new_tokens=3, ignore_eos=True)
    params = [greedy, greedy, SamplingParams(max_new_tokens=3, ignore_eos=True, temperature=0.8, seed=5)]
    monkeypatch.setenv("SPARSEPD_FORCE_TRITON", "0")
    want = _tokens(model, prompts, params)
    seen = _record_backends(monkeypatch)
    monkeypatch.setenv("SPARSEPD_FORCE_TRITON", "1")
    got = _tokens(model, prompts, params)
    assert got == want
    backends = {chosen for _, chosen in seen}
    modules = {module for module, _ in seen}
    assert backends == {"triton"} and modules >= ENGINE_KERNELS, seen
