"""The memory plan a process prints once its model and pools are allocated: weights by kind (FP8, FP4, their
scales, plain bf16/fp32, tables) and the KV pools (pages, slots, scratch), with what is left on the GPU."""

from __future__ import annotations

import torch

from sparsepd.engine.pools import KVPools, bytes_per_page, bytes_per_slot, bytes_per_snapshot
from sparsepd.model.transformer import Transformer
from sparsepd.model.weight_memory import describe, gb, weight_bytes


def memory_plan(model: Transformer, pools: KVPools, mtp: torch.nn.Module | None = None,
                mtp_pools: KVPools | None = None, undo_bytes: int = 0) -> str:
    """The plan's lines; with speculative decoding by the MTP layer, its weights and its one-layer pool too, and
    the undo log's buffers (`undo_bytes`, engine/undo_graphs.py: allocated at the first speculative step)."""
    cfg, g = model.cfg, pools.geometry
    total = pools.num_bytes()
    pages, slots = g.num_pages * bytes_per_page(cfg), g.num_slots * bytes_per_slot(cfg)
    snapshots = g.num_snapshot_slots * bytes_per_slot(cfg) + g.num_snapshot_entries * bytes_per_snapshot(cfg)
    lines = [
        f"model {cfg.name}: {cfg.n_layers} layers, weight_format {cfg.weight_format}, activations {cfg.dtype}",
        f"  weights {describe(weight_bytes(model))}",
        f"  KV pools {gb(total)}: {g.num_pages} pages × {bytes_per_page(cfg) / 1e6:.2f} MB = {gb(pages)} "
        f"({g.num_pages * g.page_size} tokens), {g.num_slots} slots × {bytes_per_slot(cfg) / 1e6:.2f} MB = "
        f"{gb(slots)}, prefix cache {gb(snapshots)} ({g.num_snapshot_entries} snapshots × "
        f"{bytes_per_snapshot(cfg) / 1e6:.2f} MB, {g.num_snapshot_slots} capture slots), rings and scratch "
        f"{gb(max(total - pages - slots - snapshots, 0))}",
    ]
    if mtp is not None:
        mtp_weights = sum(p.numel() * p.element_size() for p in mtp.parameters())
        pool = mtp_pools.num_bytes() if mtp_pools is not None else 0
        lines.append(f"  MTP layer {gb(mtp_weights + pool)}: weights {gb(mtp_weights)} (the embedding and head are "
                     f"the model's), pool {gb(pool)} (its ring per slot travels with the request)")
    if undo_bytes:
        lines.append(f"  speculative undo buffers {gb(undo_bytes)} (made at the first verification)")
    if pools.device.type == "cuda":
        free, capacity = torch.cuda.mem_get_info(pools.device)
        used = torch.cuda.memory_allocated(pools.device)
        lines.append(f"  GPU {gb(capacity)}: {gb(used)} allocated, {gb(free)} free")
    return "\n".join(lines)
