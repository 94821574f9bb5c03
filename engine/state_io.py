"""A request's complete state out of one engine's pools and into another's (what prefill ships to decode).

Exported per layer: the SWA ring `[window, row]`; for compressed layers the committed pages of the main
cache `[n_pages, rows_per_page, row]` (a row: an FP8 KV row of `row_bytes` uint8, kernels/kv_rows.py, or
`head_dim` floats when the model keeps float KV; the bytes travel as stored) and the compressor rings
`[state_size, coff·D]` (kv, score); for CSA layers also the indexer cache pages `[n_pages, rows_per_page, 144]`
and the indexer's rings. n_pages = ⌈position / page_size⌉ (the last page may be partial; uncommitted rows
travel too and are never read).
Plus the position, the tokens generated so far and the sampler's state (16 bytes, followed by the prompt's
distinct ids as a ⌈V/8⌉-byte bitmap when the request has a repetition penalty: the decode worker holds no
prompt, and the penalty needs its ids; engine/penalties.py). A grammar is not shipped: the decode worker
compiles it from the request's sampling parameters when it reserves, and `import_state` advances the
request's matcher over the generated tokens (engine/grammar.py). Contiguous host tensors (pinned
when the pools are on a GPU) with a descriptor; nothing here knows about zmq.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from sparsepd.engine.penalties import decode_prompt_ids, encode_prompt_ids
from sparsepd.engine.pools import INDEX_ROW_BYTES, KVPools, kv_row_bytes
from sparsepd.engine.request import Request
from sparsepd.engine.sampling import Sampler


class TensorSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    dtype: str
    shape: tuple[int, ...]


class StateDescriptor(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    position: int
    num_pages: int
    output_ids: tuple[int, ...]
    sampler_state: bytes
    tensors: tuple[TensorSpec, ...]

    @property
    def num_bytes(self) -> int:
        return sum(_numel(t.shape) * torch.empty(0, dtype=getattr(torch, t.dtype)).element_size() for t in self.tensors)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _views(pools: KVPools, slot: int, pages: list[int]) -> dict[str, tuple[torch.Tensor, object]]:
    """name → (pool tensor, index) for every piece of a request's state; pool[index] is the piece."""
    page_ids = torch.tensor(pages, dtype=torch.int64, device=pools.device)
    out: dict[str, tuple[torch.Tensor, object]] = {}
    for i, ratio in enumerate(pools.geometry.ratios):
        out[f"layers.{i}.swa"] = (pools.swa_view(i), slot)
        if ratio:
            out[f"layers.{i}.kv_compressed"] = (pools.compressed_view(i), page_ids)
            out[f"layers.{i}.compressor.kv"] = (pools.rings[i][0], slot)
            out[f"layers.{i}.compressor.score"] = (pools.rings[i][1], slot)
        if ratio == 4:
            out[f"layers.{i}.index_cache"] = (pools.index_cache[i], page_ids)
            out[f"layers.{i}.indexer.kv"] = (pools.index_rings[i][0], slot)
            out[f"layers.{i}.indexer.score"] = (pools.index_rings[i][1], slot)
    for name, ring in pools.extra_slot_state.items():
        out[name] = (ring, slot)
    return out


def slot_views(pools: KVPools, slot: int) -> dict[str, tuple[torch.Tensor, int]]:
    """The pieces of a request's state that live in its slot (SWA ring, compressor and indexer rings); the rest
    lives in its pages."""
    return {name: (pool, index) for name, (pool, index) in _views(pools, slot, []).items() if isinstance(index, int)}


def state_num_bytes(pools: KVPools, request: Request) -> int:
    """The bytes `export_state` would copy out of the pools for this request (nothing is copied)."""
    num_pages = pools.pages_for(request.num_computed)
    views = _views(pools, request.slot, request.pages[:num_pages]).values()
    return sum(pool[index].nbytes if isinstance(index, int) else pool[0].nbytes * num_pages for pool, index in views)


def export_state(pools: KVPools, request: Request) -> tuple[StateDescriptor, dict[str, torch.Tensor]]:
    """Copy a request's state out of the pools into contiguous host tensors."""
    if request.slot is None:
        raise ValueError(f"request {request.request_id} holds no state (no slot)")
    num_pages = pools.pages_for(request.num_computed)
    views = _views(pools, request.slot, request.pages[:num_pages])
    pin = pools.device.type == "cuda"
    tensors = {}
    for name, (pool, index) in views.items():
        piece = pool[index]
        host = torch.empty(piece.shape, dtype=piece.dtype, pin_memory=pin)
        host.copy_(piece, non_blocking=pin)
        tensors[name] = host
    if pin:
        torch.cuda.synchronize(pools.device)
    specs = tuple(TensorSpec(name=n, dtype=str(t.dtype).removeprefix("torch."), shape=tuple(t.shape))
                  for n, t in tensors.items())
    sampler_state = request.sampler.get_state()
    if request.params.repetition_penalty != 1.0:
        sampler_state += encode_prompt_ids(request.prompt_ids, pools.cfg.vocab_size)
    descriptor = StateDescriptor(position=request.num_computed, num_pages=num_pages,
                                 output_ids=tuple(request.output_ids), sampler_state=sampler_state, tensors=specs)
    return descriptor, tensors


def fork_descriptor(pools: KVPools, descriptor: StateDescriptor, fork: Request) -> StateDescriptor:
    """The descriptor of a fork of the exported request (n > 1): the same tensors, the fork's own first token
    and sampler state."""
    sampler_state = fork.sampler.get_state()
    if fork.params.repetition_penalty != 1.0:
        sampler_state += encode_prompt_ids(fork.prompt_ids, pools.cfg.vocab_size)
    return descriptor.model_copy(update=dict(output_ids=tuple(fork.output_ids), sampler_state=sampler_state))


def restore_tensors(pools: KVPools, request: Request, tensors: dict[str, torch.Tensor]) -> None:
    """Copy tensors `export_state` took from this request back into its (new) slot and pages: a retracted
    request admitted again (its host-side state never left it)."""
    num_pages = pools.pages_for(request.num_computed)
    if len(request.pages) < num_pages:
        raise ValueError(f"restore: {request.request_id} holds {len(request.pages)} pages, its state {num_pages}")
    for name, (pool, index) in _views(pools, request.slot, request.pages[:num_pages]).items():
        pool[index] = tensors[name].to(pool.device, non_blocking=True)


def copy_state(pools: KVPools, source: Request, target: Request) -> None:
    """Copy source's state into target's slot and pages on the device (a fork of source at its position)."""
    if source.slot is None or target.slot is None:
        raise ValueError(f"copy_state: {source.request_id} and {target.request_id} must both hold a slot")
    num_pages = pools.pages_for(source.num_computed)
    if len(target.pages) < num_pages:
        raise ValueError(f"copy_state: {target.request_id} holds {len(target.pages)} pages, the state needs "
                         f"{num_pages}")
    src = _views(pools, source.slot, source.pages[:num_pages])
    dst = _views(pools, target.slot, target.pages[:num_pages])
    for name, (pool, index) in dst.items():
        pool[index] = pool[src[name][1]]
    target.num_computed = source.num_computed


def expected_specs(pools: KVPools, num_pages: int) -> tuple[TensorSpec, ...]:
    """The tensors an import of a state with num_pages committed pages must carry, in order."""
    views = _views(pools, 0, list(range(num_pages)))
    return tuple(TensorSpec(name=n, dtype=str(p.dtype).removeprefix("torch."),
                            shape=tuple(p[0].shape) if not isinstance(i, torch.Tensor) else (num_pages, *p.shape[1:]))
                 for n, (p, i) in views.items())


def import_state(pools: KVPools, request: Request, descriptor: StateDescriptor,
                 tensors: dict[str, torch.Tensor]) -> None:
    """Copy a shipped state into the request's reserved slot and pages; raise ValueError on any mismatch."""
    if request.slot is None or not request.pages:
        raise ValueError(f"request {request.request_id} has no reserved slot and pages")
    if descriptor.num_pages > len(request.pages):
        raise ValueError(f"state has {descriptor.num_pages} pages, the reservation {len(request.pages)}")
    if descriptor.num_pages != pools.pages_for(descriptor.position):
        raise ValueError(f"state at position {descriptor.position} must carry {pools.pages_for(descriptor.position)} "
                         f"pages, not {descriptor.num_pages}")
    state = descriptor.sampler_state[:Sampler.STATE_BYTES]
    prompt_bitmap = descriptor.sampler_state[Sampler.STATE_BYTES:]
    if bool(prompt_bitmap) != (request.params.repetition_penalty != 1.0):
        raise ValueError(f"sampler state of {len(descriptor.sampler_state)} bytes: the prompt's ids come with it "
                         "exactly when the request has a repetition penalty")
    prompt_id_set = decode_prompt_ids(prompt_bitmap, pools.cfg.vocab_size) if prompt_bitmap else None
    want = expected_specs(pools, descriptor.num_pages)
    if descriptor.tensors != want:
        raise ValueError("state tensors do not match this engine: "
                         f"{sorted({t.name for t in want} ^ {t.name for t in descriptor.tensors}) or 'shape/dtype'}")
    for spec in want:
        got = tensors.get(spec.name)
        if got is None or tuple(got.shape) != spec.shape or str(got.dtype).removeprefix("torch.") != spec.dtype:
            raise ValueError(f"tensor {spec.name}: expected {spec.dtype} {spec.shape}, got "
                             f"{None if got is None else (got.dtype, tuple(got.shape))}")
    if request.grammar is not None:
        request.grammar.replay(descriptor.output_ids)
    views = _views(pools, request.slot, request.pages[: descriptor.num_pages])
    for name, (pool, index) in views.items():
        pool[index] = tensors[name].to(pool.device, non_blocking=True)
    request.num_computed = descriptor.position
    request.output_ids = list(descriptor.output_ids)
    request.sampler.set_state(state)
    request.sampler.prompt_id_set = prompt_id_set


def shipped_bytes(cfg, position: int) -> int:
    """Bytes of a request's exported state at `position` (the README's formula; tests check it). A main KV row
    is `kv_row_bytes(cfg)`: 584 for V4's FP8 KV rows, head_dim · dtype bytes for float rows."""
    row = kv_row_bytes(cfg)
    pages = -(-position // cfg.page_size)
    total = 0
    for ratio in cfg.compress_ratios:
        total += cfg.window * row
        if ratio:
            coff = 2 if ratio == 4 else 1
            total += 2 * coff * ratio * coff * cfg.head_dim * 4 + pages * (cfg.page_size // ratio) * row
        if ratio == 4:
            total += 2 * 8 * 2 * cfg.index_head_dim * 4 + pages * (cfg.page_size // 4) * INDEX_ROW_BYTES
    return total
