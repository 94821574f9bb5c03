"""The prefix cache's boundary snapshots, slimmed to what a restore at a page boundary p reads
(docs/dsv4-spec.md "Attention layer", "Compressor", "Indexer"):

- per layer the SWA ring: the last `window` positions before p (with the page equal to the window, V4's case: the
  rows of the page before p), `[window, row]`;
- per CSA layer (compressor with overlap, coff = 2) the carried half-block of the compressor's rings and of the
  indexer's: the entry that ends at p + ratio − 1 pools positions p − ratio … p + ratio − 1, so the `ratio`
  positions before p (`[ratio, 2·d]` fp32 each for kv and score); nothing older is read again;
- nothing for an HCA layer (coff = 1): its block ends at p (p is a multiple of the page, the lcm of the ratios), so
  every ring row is written again before it is read.

A forward captures a boundary's whole slot state into a capture slot (engine/batch.py's capture rows); the
prefix cache saves these pieces into a store entry (`save`, a device copy stream-ordered after the forward) and
frees the capture slot. `load` writes an entry (or its host-tier copy) into a fresh slot (`KVPools.reset_slot`:
compressor kv 0 / score −inf where nothing is carried). Bytes per entry: `pools.bytes_per_snapshot`.

Slot state of a layer outside the pools (`KVPools.extra_slot_state`: the MTP layer's SWA ring under speculative
decoding, engine/drafter.py) is kept whole in every entry once registered (`add_part`); the forward of that layer
runs after the model's, so its part is saved after it (`save_extra`), from the same capture slot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sparsepd.model_config import ModelConfig

if TYPE_CHECKING:
    from sparsepd.engine.pools import KVPools, PoolGeometry


class SnapshotStore:
    def __init__(self, cfg: ModelConfig, geometry: PoolGeometry, device: torch.device,
                 row_shape: tuple[int, ...], row_dtype: torch.dtype):
        n, self.window = geometry.num_snapshot_entries, geometry.window
        self.ratios = geometry.ratios
        self.parts: dict[str, torch.Tensor] = {}  # name → [entries, rows, width]
        for i, ratio in enumerate(geometry.ratios):
            self.parts[f"layers.{i}.swa"] = torch.zeros(n, geometry.window, *row_shape, dtype=row_dtype, device=device)
            if ratio == 4:
                for what, d in (("compressor", cfg.head_dim), ("indexer", cfg.index_head_dim)):
                    self.parts[f"layers.{i}.{what}.kv"] = torch.zeros(n, ratio, 2 * d, device=device)
                    self.parts[f"layers.{i}.{what}.score"] = torch.zeros(n, ratio, 2 * d, device=device)
        self._rows: dict[int, torch.Tensor] = {}  # boundary mod 8 → the CSA ring rows of the carried positions
        self.num_entries = n
        self.extra: list[str] = []  # names of `pools.extra_slot_state` kept whole in every entry
        self.device = device

    def add_part(self, name: str, ring: torch.Tensor) -> None:
        """Keep `ring[slot]` (a `KVPools.extra_slot_state` tensor `[ring_slots, ...]`) in every entry from now on."""
        if name in self.parts:
            raise ValueError(f"the snapshot store already keeps {name!r}")
        self.parts[name] = torch.zeros(self.num_entries, *ring.shape[1:], dtype=ring.dtype, device=self.device)
        self.extra.append(name)

    @property
    def extra_bytes(self) -> int:
        """Bytes per entry of the parts `add_part` registered."""
        return sum(self.parts[name][0].nbytes for name in self.extra)

    def carry_rows(self, boundary: int) -> torch.Tensor:
        """Ring rows (position q at row q mod 8: model/state.py) of positions boundary − 4 … boundary − 1."""
        key = boundary % 8
        if key not in self._rows:
            self._rows[key] = torch.tensor([(boundary - 4 + j) % 8 for j in range(4)], device=self.device)
        return self._rows[key]

    def _slot_pieces(self, pools: KVPools, layer: int, ratio: int) -> list[tuple[str, torch.Tensor]]:
        out = [(f"layers.{layer}.swa", pools.swa_view(layer))]
        if ratio == 4:
            for what, rings in (("compressor", pools.rings[layer]), ("indexer", pools.index_rings[layer])):
                out += [(f"layers.{layer}.{what}.kv", rings[0]), (f"layers.{layer}.{what}.score", rings[1])]
        return out

    def save(self, pools: KVPools, entry: int, slot: int, boundary: int) -> None:
        """The pieces of `slot`'s state at `boundary` into `entry` (device copies, stream-ordered)."""
        rows = self.carry_rows(boundary)
        for i, ratio in enumerate(self.ratios):
            for name, pool in self._slot_pieces(pools, i, ratio):
                self.parts[name][entry] = pool[slot] if name.endswith(".swa") else pool[slot].index_select(0, rows)

    def save_extra(self, pools: KVPools, saved: list[tuple[int, int]]) -> None:
        """The registered parts of capture slots into their entries ((entry, slot) pairs from the prefix cache's
        commit), once the layer they belong to has run its forward over the captured positions."""
        for name in self.extra:
            ring = pools.extra_slot_state[name]
            for entry, slot in saved:
                self.parts[name][entry] = ring[slot]

    def load(self, pools: KVPools, source: int | dict[str, torch.Tensor], slot: int, boundary: int) -> None:
        """An entry (or its host copy: name → tensor) into a fresh `slot` at `boundary`."""
        rows = self.carry_rows(boundary)
        for i, ratio in enumerate(self.ratios):
            for name, pool in self._slot_pieces(pools, i, ratio):
                piece = self.parts[name][source] if isinstance(source, int) else \
                    source[name].to(self.device, non_blocking=True)
                if name.endswith(".swa"):
                    pool[slot] = piece
                else:
                    pool[slot].index_copy_(0, rows, piece)
        for name in self.extra:
            pools.extra_slot_state[name][slot] = self.parts[name][source] if isinstance(source, int) else \
                source[name].to(self.device, non_blocking=True)

    def to_host(self, entry: int) -> dict[str, torch.Tensor]:
        """A host copy of an entry (pinned on a GPU; stream-ordered, so the entry may be written again after)."""
        pin = self.device.type == "cuda"
        out = {}
        for name, part in self.parts.items():
            out[name] = torch.empty(part.shape[1:], dtype=part.dtype, pin_memory=pin)
            out[name].copy_(part[entry], non_blocking=pin)
        return out

    @property
    def entry_bytes(self) -> int:
        return sum(part[0].nbytes for part in self.parts.values())
