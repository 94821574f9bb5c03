"""The workers drive the engine through `Engine`'s methods only (docs/DESIGN.md §8), and those methods do what a
worker relies on: a request moved from one engine to another through them (prefill and export on one; reserve,
import and activate on the other) gives the tokens of a run in one engine, `load()` counts what is held at each
stage, and every page and slot comes back."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import OutOfCapacity, PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset

ROOT = Path(__file__).resolve().parents[2]
WORKERS = ("prefill_worker", "decode_worker")
# The engine's parts: a worker that reaches them depends on how the engine is built inside.
PARTS = {"scheduler", "pools", "runner", "grammars"}


def reaches_into(source: str) -> list[tuple[int, str]]:
    """(line, part) of every `engine.<part>` and `….engine.<part>` in the source."""
    def is_engine(node: ast.expr) -> bool:
        return (isinstance(node, ast.Name) and node.id == "engine") or (
            isinstance(node, ast.Attribute) and node.attr == "engine")

    return [(n.lineno, n.attr) for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.Attribute) and n.attr in PARTS and is_engine(n.value)]


def test_the_workers_use_only_the_engine_interface():
    found = [f"{path.relative_to(ROOT)}:{line}: .{attr}" for folder in WORKERS
             for path in sorted((ROOT / folder).rglob("*.py")) for line, attr in reaches_into(path.read_text())]
    assert not found, "\n".join(found)


def test_the_check_sees_a_reach_into_the_engine():
    assert reaches_into("def f(w):\n    return len(w.engine.scheduler.running)") == [(2, "scheduler")]
    assert reaches_into("pools = engine.pools\nengine.load()") == [(1, "pools")]
    assert reaches_into("Engine(model, cfg.pools)\nself.engine.add(r)") == []


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny"), seed=0)


def _engine(model) -> Engine:
    return Engine(model, PoolConfig(num_slots=4, max_batch_tokens=64, num_pages=24))


def _full(engine: Engine) -> tuple[int, int]:
    load = engine.load()
    return load.num_pages - load.free_pages, load.num_slots - load.free_slots


def test_a_request_moved_between_engines_through_the_interface_gives_the_same_tokens(model):
    params = SamplingParams(max_new_tokens=9, ignore_eos=True, temperature=0.8, seed=11)
    prompt = torch.randint(0, 256, (37,), generator=torch.Generator().manual_seed(29)).tolist()
    want = _engine(model).generate([prompt], params)[0].output_ids

    source, target = _engine(model), _engine(model)
    request = source.make_request(prompt, params, "moved")
    source.add(request)
    assert source.has_work and [r.request_id for r in source.requests()] == ["moved"]
    while not request.output_ids:
        source.step()
    descriptor, tensors = source.export_state(request)
    assert source.abort("moved") and _full(source) == (0, 0) and not source.has_work

    held = target.make_request([0] * len(prompt), params, "moved")
    target.reserve(held)
    load = target.load()
    assert (load.num_slots - load.free_slots, load.running, load.waiting) == (1, 0, 0)
    assert load.num_pages - load.free_pages == target.pages_for(len(prompt) + 1)
    assert [t.name for t in target.state_specs(descriptor.num_pages)] == [t.name for t in descriptor.tensors]
    target.ensure_pages(held, descriptor.position + 1)
    target.import_state(held, descriptor, tensors)
    target.activate(held)
    assert target.has_running and target.load().running == 1
    while target.has_work:
        target.step()
    assert held.output_ids == want
    assert _full(target) == (0, 0) and target.holds_nothing()


def test_a_reservation_leaves_the_running_requests_room_to_grow_and_is_released_whole(model):
    engine = _engine(model)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    running = [engine.make_request(list(range(1, 30)), params, f"run-{i}") for i in range(2)]
    for r in running:
        engine.add(r)
    while any(not r.output_ids for r in running):
        engine.step()
    free = engine.load().free_pages
    big = engine.make_request([0] * (free - 2) * get_preset("tiny").page_size, params, "big")
    with pytest.raises(OutOfCapacity, match="leaves 2 for the running requests' growth"):
        engine.reserve(big)  # its pages and the next token's would leave fewer free than the 2 decoding need
    assert engine.load().free_pages == free and big.slot is None
    small = engine.make_request([0] * 5, params, "small")
    engine.reserve(small)
    engine.release(small)
    assert small.slot is None and small.pages == [] and engine.load().free_pages == free
    for r in running:
        assert engine.abort(r.request_id)
    assert _full(engine) == (0, 0)
