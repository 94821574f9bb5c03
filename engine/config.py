"""What a process that runs the model needs to know: the model, its weights, the device, the pools.

One frozen pydantic model, validated at the edge (the CLI) and trusted inside; each worker's own config
holds one of these. `add_engine_args` / `engine_config_from_args` keep the flags the same everywhere.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from sparsepd.engine.pools import PoolConfig
from sparsepd.grammar import Vocabulary
from sparsepd.model.checkpoint_config import read_checkpoint_config
from sparsepd.model.config import ModelConfig, get_preset
from sparsepd.model.transformer import Transformer
from sparsepd.model.weights import build_model


class EngineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: str = "tiny"
    checkpoint: str | None = None
    seed: int = Field(0, ge=0, description="random-weight seed (every process of a deployment must agree)")
    device: str = "cpu"
    pools: PoolConfig = PoolConfig(num_slots=32, max_batch_tokens=512, num_pages=512)
    cuda_graph: bool = Field(True, description="decode steps replay CUDA graphs (on a CUDA device)")
    graph_max_context: int = Field(8192, ge=1, description="graphs captured at start cover contexts up to this")
    overlap: bool = Field(True, description="launch step N+1 before reading step N's tokens (decode worker)")
    max_retracted_memory: int | None = Field(None, ge=0, description="bytes of host memory retracted requests' "
                                             "states may take (decode worker); None: the KV pool's size")

    def resolve_model_config(self) -> ModelConfig:
        """The checkpoint's own config.json (ours or the published DeepSeek-V4 form) when it has one: no
        preset needed; the preset otherwise (random weights, or a weights directory without a config.json)."""
        return (read_checkpoint_config(self.checkpoint) if self.checkpoint else None) or get_preset(self.preset)

    def build_model(self) -> Transformer:
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but no CUDA device is available")
        if self.device.startswith("cuda"):
            # Triton launches on the current device, whatever the tensors' device: make it this process's one
            # (for this thread; the runner does the same for the threads that step the engine).
            torch.cuda.set_device(torch.device(self.device))
        return build_model(self.resolve_model_config(), seed=self.seed, checkpoint=self.checkpoint, device=self.device)

    def vocabulary(self, model_config: ModelConfig) -> Vocabulary:
        """What grammars compile against: the checkpoint's tokenizer.json when it has one (as the router's model
        card and model/tokenizer.py read it), else the byte vocabulary."""
        path = Path(self.checkpoint) / "tokenizer.json" if self.checkpoint else None
        text = path.read_text() if path is not None and path.is_file() else None
        return Vocabulary(vocab_size=model_config.vocab_size, eos_id=model_config.eos_id, tokenizer_json=text)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and memory")
    g.add_argument("--preset", default="tiny", help="model preset: tiny, bench, v4-flash, v4-pro (default: tiny)")
    g.add_argument("--checkpoint", default=None, help="directory of safetensors weights (default: random init)")
    g.add_argument("--seed", type=int, default=0, help="random-weight seed; all workers must agree (default: 0)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    g.add_argument("--num-slots", type=int, default=32, help="requests holding state at once (default: 32)")
    g.add_argument("--max-batch-tokens", type=int, default=512, help="tokens per forward (default: 512)")
    g.add_argument("--num-pages", type=int, default=None,
                   help="KV pages (page = 128 tokens on real presets); default: from --kv-memory")
    g.add_argument("--kv-memory", type=int, default=None, help="bytes for pages, slots and scratch")
    g.add_argument("--gpu-memory-fraction", type=float, default=0.5,
                   help="of free GPU memory when neither --num-pages nor --kv-memory is given (default: 0.5)")
    g.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="run decode steps eagerly instead of replaying CUDA graphs (debugging; GPU only)")
    g.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="read each step's tokens before launching the next (no host/device overlap; debugging)")
    g.add_argument("--graph-max-context", type=int, default=8192,
                   help="decode graphs captured at start cover contexts up to this many tokens; longer ones "
                        "are captured on first use (default: 8192)")


def add_prefix_cache_args(p: argparse.ArgumentParser, who: str = "") -> None:
    c = p.add_argument_group("prefix cache (engine/prefix_cache.py)" + (f": {who}" if who else ""))
    c.add_argument("--prefix-cache-entries", type=int, default=256,
                   help="prompts whose state is kept for later requests that start with them; each entry holds "
                        "its pages (shared) and a copy of a slot, counted in the memory plan (default: %(default)s)")
    c.add_argument("--disable-prefix-cache", action="store_true",
                   help="no prefix cache: every request is prefilled from its first token")


def with_prefix_cache(cfg: EngineConfig, args: argparse.Namespace, enabled: bool = True) -> EngineConfig:
    """cfg with the prefix cache the flags ask for (none when not enabled for this process)."""
    if args.prefix_cache_entries < 0:
        raise ValueError(f"--prefix-cache-entries must be ≥ 0, got {args.prefix_cache_entries}")
    entries = args.prefix_cache_entries if enabled and not args.disable_prefix_cache else 0
    return cfg.model_copy(update=dict(pools=cfg.pools.model_copy(update=dict(prefix_cache_entries=entries))))


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    num_pages = args.num_pages
    if num_pages is None and args.kv_memory is None and not args.device.startswith("cuda"):
        num_pages = 512
    pools = PoolConfig(num_slots=args.num_slots, max_batch_tokens=args.max_batch_tokens, num_pages=num_pages,
                       kv_memory_bytes=args.kv_memory, gpu_memory_fraction=args.gpu_memory_fraction)
    return EngineConfig(preset=args.preset, checkpoint=args.checkpoint, seed=args.seed, device=args.device,
                        pools=pools, cuda_graph=args.cuda_graph, graph_max_context=args.graph_max_context,
                        overlap=args.overlap)
