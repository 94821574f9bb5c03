"""Model configuration and the preset table (docs/DESIGN.md §8, docs/dsv4-spec.md "Configurations").

One frozen pydantic model holds every size; everything else (state shapes, page geometry, rope tables)
is derived from it. Presets are looked up by exact name; an unknown name lists the valid ones.

In the torch-free floor (docs/DESIGN.md §2): the model package builds from it, and the router reads the same
presets (its model card, sparsepd/fingerprint.py) without importing the model.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator


class ModelConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    vocab_size: int
    dim: int
    n_layers: int
    n_hash_layers: int
    # attention
    n_heads: int
    head_dim: int
    rope_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    window: int
    compress_ratios: tuple[int, ...]  # one per layer: 0 = sliding window only, 4 = CSA, other = HCA
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_seq_len: int = 65536
    beta_fast: int = 32
    beta_slow: int = 1
    # indexer (CSA layers)
    index_n_heads: int
    index_head_dim: int = 128
    index_topk: int
    # MoE
    n_routed_experts: int
    n_activated_experts: int
    n_shared_experts: int = 1
    moe_inter_dim: int
    route_scale: float
    swiglu_limit: float = 10.0
    # hyper-connections
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    # serving geometry
    max_seq_len: int
    page_size: int = 128  # original tokens per page: the lcm of the compress ratios
    # numerics
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    quantize_kv: bool = True  # FP8 round trip on the KV nope dims (main KV and compressed KV)
    indexer_quant: Literal["fp8", "fp4", "none"] = "fp8"  # fp8: serving cache; fp4: reference simulation
    # How the weights are held in memory (model/linear.py): plain = every weight in `dtype` (a quantized
    # checkpoint dequantized: the reference); fp8 = the projections V4 stores in FP8 (FP8_PROJECTIONS) stay
    # e4m3 with fp32 128×128 tile scales; fp8_fp4 = that, and the routed experts stay packed FP4 e2m1 with
    # ue8m0 scales per 32 inputs.
    weight_format: Literal["plain", "fp8", "fp8_fp4"] = "plain"
    # tokenizer
    bos_id: int = 0
    eos_id: int = 1

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"preset {self.name!r}: {what}")

        need(len(self.compress_ratios) == self.n_layers,
             f"compress_ratios has {len(self.compress_ratios)} entries, expected n_layers={self.n_layers}")
        need(all(r >= 0 for r in self.compress_ratios), f"negative compress ratio in {self.compress_ratios}")
        need(0 < self.rope_dim <= self.head_dim and self.rope_dim % 2 == 0,
             f"rope_dim={self.rope_dim} must be even and in (0, head_dim={self.head_dim}]")
        need((self.head_dim - self.rope_dim) % 64 == 0 or not self.quantize_kv,
             f"nope dims {self.head_dim - self.rope_dim} must be a multiple of the FP8 block 64")
        need(self.n_heads * self.head_dim % self.o_groups == 0, "n_heads*head_dim must divide into o_groups")
        need(self.index_head_dim == 128 or 4 not in self.compress_ratios,
             f"index_head_dim={self.index_head_dim}: the FP8 indexer cache rows hold 128 values")
        need(self.n_activated_experts <= self.n_routed_experts, "more activated than routed experts")
        need(self.n_hash_layers <= self.n_layers, "more hash layers than layers")
        for r in set(self.compress_ratios) - {0}:
            need(self.page_size % r == 0, f"page_size={self.page_size} is not a multiple of ratio {r}")
        need(self.bos_id < self.vocab_size and self.eos_id < self.vocab_size, "bos/eos outside the vocabulary")
        need(self.weight_format != "fp8_fp4" or fp4_experts_fit(self),
             f"weight_format='fp8_fp4' needs dim={self.dim} and moe_inter_dim={self.moe_inter_dim} to be multiples "
             f"of {FP4_BLOCK} (one FP4 scale per {FP4_BLOCK} inputs); use 'fp8' (experts in {self.dtype})")
        return self

    # --- derived sizes -------------------------------------------------------------------------
    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.rope_dim

    @property
    def softmax_scale(self) -> float:
        return self.head_dim**-0.5

    def layer_kind(self, layer_id: int) -> Literal["swa", "csa", "hca"]:
        ratio = self.compress_ratios[layer_id]
        return "swa" if ratio == 0 else ("csa" if ratio == 4 else "hca")

    def max_entries(self, ratio: int) -> int:
        """Compressed entries a request of max_seq_len tokens commits at this ratio."""
        return self.max_seq_len // ratio


FP4_BLOCK = 32  # inputs of a routed expert's weight row that share one ue8m0 scale


def fp4_experts_fit(cfg: ModelConfig) -> bool:
    """Whether the routed experts' dims allow packed FP4 with per-32 scales (both GEMMs' K)."""
    return cfg.dim % FP4_BLOCK == 0 and cfg.moe_inter_dim % FP4_BLOCK == 0


def quantized_format(cfg: ModelConfig) -> Literal["fp8", "fp8_fp4"]:
    """The most quantized weight format the dims allow: FP4 experts when they fit, else FP8 projections only."""
    return "fp8_fp4" if fp4_experts_fit(cfg) else "fp8"


def with_num_layers(cfg: ModelConfig, n_layers: int) -> ModelConfig:
    """`cfg` cut to its first `n_layers` layers, keeping the published pattern of layer kinds: the same compress
    ratios layer by layer, the hash-routed layers first (as many as fit)."""
    if not 1 <= n_layers <= cfg.n_layers:
        raise ValueError(f"num_layers={n_layers}: {cfg.name!r} has {cfg.n_layers} layers; expected 1 … {cfg.n_layers}")
    return ModelConfig(**{**cfg.model_dump(), "n_layers": n_layers, "compress_ratios": cfg.compress_ratios[:n_layers],
                          "n_hash_layers": min(cfg.n_hash_layers, n_layers)})


def _v4_ratios(first: tuple[int, ...], n_layers: int) -> tuple[int, ...]:
    """`first`, then alternating 4/128 for the rest of the layers (the published pattern)."""
    rest = n_layers - len(first)
    return first + tuple(4 if i % 2 == 0 else 128 for i in range(rest))


PRESETS: dict[str, ModelConfig] = {
    # CPU-fast: every layer kind, a hash layer and routed layers; window and HCA ratio 16 so 100-token
    # prompts cross many boundaries and wrap the ring; top-k 4 so the indexer really drops entries.
    "tiny": ModelConfig(
        name="tiny", vocab_size=260, dim=64, n_layers=5, n_hash_layers=1,
        n_heads=4, head_dim=96, rope_dim=32, q_lora_rank=48, o_groups=2, o_lora_rank=32,
        window=16, compress_ratios=(0, 4, 16, 4, 0),
        rope_factor=4.0, original_seq_len=256,
        index_n_heads=4, index_head_dim=128, index_topk=4,
        n_routed_experts=8, n_activated_experts=2, moe_inter_dim=48, route_scale=1.5,
        max_seq_len=1024, page_size=16, dtype="float32", bos_id=256, eos_id=257,
    ),
    # Real V4 attention dims, few layers, a small MoE: for GPU benchmarks.
    "bench": ModelConfig(
        name="bench", vocab_size=129280, dim=4096, n_layers=4, n_hash_layers=1,
        n_heads=64, head_dim=512, rope_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024,
        window=128, compress_ratios=(0, 4, 128, 4),
        index_n_heads=64, index_head_dim=128, index_topk=512,
        n_routed_experts=16, n_activated_experts=6, moe_inter_dim=512, route_scale=1.5,
        max_seq_len=65536, page_size=128,
    ),
    "v4-flash": ModelConfig(
        name="v4-flash", vocab_size=129280, dim=4096, n_layers=43, n_hash_layers=3,
        n_heads=64, head_dim=512, rope_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024,
        window=128, compress_ratios=_v4_ratios((0, 0), 43),
        index_n_heads=64, index_head_dim=128, index_topk=512,
        n_routed_experts=256, n_activated_experts=6, moe_inter_dim=2048, route_scale=1.5,
        max_seq_len=1048576, page_size=128,
    ),
    "v4-pro": ModelConfig(
        name="v4-pro", vocab_size=129280, dim=7168, n_layers=61, n_hash_layers=3,
        n_heads=128, head_dim=512, rope_dim=64, q_lora_rank=1536, o_groups=8, o_lora_rank=1024,
        window=128, compress_ratios=_v4_ratios((128, 128), 61),
        index_n_heads=64, index_head_dim=128, index_topk=1024,
        n_routed_experts=384, n_activated_experts=6, moe_inter_dim=3072, route_scale=2.5,
        max_seq_len=1048576, page_size=128,
    ),
}


def get_preset(name: str, **overrides: object) -> ModelConfig:
    """The preset `name`, optionally with fields replaced (validated again)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    base = PRESETS[name]
    if not overrides:
        return base
    return ModelConfig(**{**base.model_dump(), **overrides})


def lcm_of_ratios(cfg: ModelConfig) -> int:
    return math.lcm(*[r for r in cfg.compress_ratios if r] or [1])
