"""A request's explicit state: everything the network keeps between `prefill` and `decode` calls.

Per layer (docs/dsv4-spec.md; docs/DESIGN.md §6 gives the paged form the engine uses):
- `swa`: the sliding-window ring `[window, head_dim]`, position p at row p % window;
- compressor rings `kv`/`score` `[state_size, coff·d]` fp32, position p at row p % state_size
  (state_size = 2·ratio with overlap, ratio without), score already carrying the positional bias;
- `kv_compressed` `[entries, head_dim]`: committed compressed KV (CSA and HCA layers);
- for CSA layers the indexer's own compressor rings and `index_keys`, the committed indexer keys: FP8
  cache rows `[entries, 144]` uint8 (kernels/indexer.py's format, the default), or `[entries, 128]` fp32
  after the reference's FP4 simulation or no quantization.

`RequestState.tensors()` names every tensor, so states can be enumerated, copied, compared and shipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparsepd.kernels.indexer import ROW_BYTES as INDEX_ROW_BYTES
from sparsepd.model_config import ModelConfig


@dataclass
class CompressorRing:
    kv: torch.Tensor  # [state_size, coff*d] fp32
    score: torch.Tensor  # [state_size, coff*d] fp32, -inf where never written

    @staticmethod
    def fresh(ratio: int, d: int, device: torch.device) -> CompressorRing:
        coff = 2 if ratio == 4 else 1
        state_size = coff * ratio
        return CompressorRing(
            kv=torch.zeros(state_size, coff * d, dtype=torch.float32, device=device),
            score=torch.full((state_size, coff * d), float("-inf"), dtype=torch.float32, device=device),
        )


@dataclass
class LayerState:
    swa: torch.Tensor  # [window, head_dim]
    compressor: CompressorRing | None = None
    kv_compressed: torch.Tensor | None = None  # [entries, head_dim]
    indexer: CompressorRing | None = None
    index_keys: torch.Tensor | None = None  # [entries, 144] uint8 FP8 rows, or [entries, 128] fp32


@dataclass
class RequestState:
    position: int = 0  # tokens processed so far
    layers: list[LayerState] = field(default_factory=list)

    @staticmethod
    def fresh(cfg: ModelConfig, device: torch.device | str = "cpu") -> RequestState:
        device = torch.device(device)
        dtype = getattr(torch, cfg.dtype)
        layers = []
        for ratio in cfg.compress_ratios:
            layer = LayerState(swa=torch.zeros(cfg.window, cfg.head_dim, dtype=dtype, device=device))
            if ratio:
                layer.compressor = CompressorRing.fresh(ratio, cfg.head_dim, device)
                layer.kv_compressed = torch.zeros(0, cfg.head_dim, dtype=dtype, device=device)
            if ratio == 4:
                layer.indexer = CompressorRing.fresh(ratio, cfg.index_head_dim, device)
                layer.index_keys = (torch.zeros(0, INDEX_ROW_BYTES, dtype=torch.uint8, device=device)
                                    if cfg.indexer_quant == "fp8" else
                                    torch.zeros(0, cfg.index_head_dim, dtype=torch.float32, device=device))
            layers.append(layer)
        return RequestState(position=0, layers=layers)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the state by a stable name, e.g. `layers.3.compressor.kv`."""
        out: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            out[f"layers.{i}.swa"] = layer.swa
            for ring_name in ("compressor", "indexer"):
                ring = getattr(layer, ring_name)
                if ring is not None:
                    out[f"layers.{i}.{ring_name}.kv"] = ring.kv
                    out[f"layers.{i}.{ring_name}.score"] = ring.score
            if layer.kv_compressed is not None:
                out[f"layers.{i}.kv_compressed"] = layer.kv_compressed
            if layer.index_keys is not None:
                out[f"layers.{i}.index_keys"] = layer.index_keys
        return out

    def clone(self) -> RequestState:
        def ring(r: CompressorRing | None) -> CompressorRing | None:
            return None if r is None else CompressorRing(r.kv.clone(), r.score.clone())

        def opt(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.clone()

        return RequestState(self.position, [
            LayerState(l.swa.clone(), ring(l.compressor), opt(l.kv_compressed), ring(l.indexer), opt(l.index_keys))
            for l in self.layers
        ])

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def differences(self, other: RequestState) -> list[str]:
        """Names of the tensors that are not bit-identical (empty when the states are equal)."""
        mine, theirs = self.tensors(), other.tensors()
        names = sorted(set(mine) | set(theirs))
        diff = [n for n in names if n not in mine or n not in theirs or mine[n].shape != theirs[n].shape
                or not torch.equal(mine[n], theirs[n])]
        if self.position != other.position:
            diff.insert(0, f"position {self.position} != {other.position}")
        return diff


def state_bytes(cfg: ModelConfig, length: int) -> int:
    """Bytes of a request's state after `length` tokens (the formula in the README)."""
    s = torch.finfo(getattr(torch, cfg.dtype)).bits // 8
    total = 0
    for ratio in cfg.compress_ratios:
        total += cfg.window * cfg.head_dim * s
        if ratio:
            coff = 2 if ratio == 4 else 1
            total += 2 * coff * ratio * coff * cfg.head_dim * 4 + (length // ratio) * cfg.head_dim * s
        if ratio == 4:
            key_bytes = INDEX_ROW_BYTES if cfg.indexer_quant == "fp8" else cfg.index_head_dim * 4
            total += 2 * 8 * 2 * cfg.index_head_dim * 4 + (length // 4) * key_bytes
    return total
