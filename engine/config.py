"""What a process that runs the model needs to know: the model, its weights, the device, the pools.

One frozen pydantic model, validated at the edge (the CLI) and trusted inside; each worker's own config
holds one of these. The flags are engine/args.py's (torch-free, so that a parser builds without the model);
`engine_config_from_args` reads them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from sparsepd.engine.pools import PoolConfig
from sparsepd.gpu_wait import GpuWait
from sparsepd.grammar import Vocabulary
from sparsepd.load_options import LoadOptions, load_options_from_args, resolve_model_config
from sparsepd.model.mtp import MTPBlock, load_mtp, random_mtp
from sparsepd.model.transformer import Transformer
from sparsepd.model.weights import build_model
from sparsepd.model_config import ModelConfig


class EngineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: str = "tiny"
    checkpoint: str | None = None
    seed: int = Field(0, ge=0, description="random-weight seed (every process of a deployment must agree)")
    load: LoadOptions = LoadOptions()  # --load-format, --dtype, --num-layers (sparsepd/load_options.py)
    device: str = "cpu"
    pools: PoolConfig = PoolConfig(num_slots=32, max_batch_tokens=512, num_pages=512)
    cuda_graph: bool = Field(True, description="decode steps replay CUDA graphs (on a CUDA device)")
    prefill_cuda_graph: bool = Field(False, description="forwards of a few prompt chunks replay CUDA graphs too "
                                     "(engine/prefill_graphs.py)")
    graph_max_context: int = Field(8192, ge=1, description="graphs captured at start cover contexts up to this")
    overlap: bool = Field(True, description="launch step N+1 before reading step N's tokens (decode worker)")
    gpu_wait: GpuWait = Field("spin", description="how the host waits for a step's tokens on a CUDA device: spin "
                              "(CUDA's default event, busy-polling) or block (a blocking-sync event: the thread "
                              "sleeps); engine/draw.py `host_event`")
    speculative_num_steps: int = Field(0, ge=0, le=7, description="drafted tokens per decode step (0: off)")
    max_retracted_memory: int | None = Field(None, ge=0, description="bytes of host memory retracted requests' "
                                             "states may take (decode worker); None: the KV pool's size")

    def resolve_model_config(self) -> ModelConfig:
        """The checkpoint's own config.json (ours or the published DeepSeek-V4 form) when it has one: no
        preset needed; the preset otherwise (random weights, or a weights directory without a config.json); with
        the load options applied (depth, weight format)."""
        return resolve_model_config(self.preset, self.checkpoint, self.load)

    def build_model(self, experts: range | None = None) -> Transformer:
        """experts: the routed experts this process holds (a rank of a group: engine/group.py; default all)."""
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but no CUDA device is available")
        if self.device.startswith("cuda"):
            # Triton launches on the current device, whatever the tensors' device: make it this process's one
            # (for this thread; the runner does the same for the threads that step the engine).
            torch.cuda.set_device(torch.device(self.device))
        return build_model(self.resolve_model_config(), seed=self.seed, checkpoint=self.checkpoint, device=self.device,
                           load_format=self.load.load_format, experts=experts)

    def build_mtp(self, model: Transformer) -> MTPBlock | None:
        """The MTP layer speculative decoding drafts with (None when off): the checkpoint's `mtp.0.*` tensors, or
        random weights from seed + 1 for a preset without a checkpoint."""
        if not self.speculative_num_steps:
            return None
        cfg = model.cfg
        if self.checkpoint is None:
            return random_mtp(cfg, self.seed + 1).to(model.device)
        if cfg.weight_format != "plain":
            raise ValueError(f"--speculative-num-steps reads a plain MTP layer; the model's weight_format is "
                             f"{cfg.weight_format!r}")
        return load_mtp(cfg, self.checkpoint).to(model.device)

    def vocabulary(self, model_config: ModelConfig) -> Vocabulary:
        """What grammars compile against: the checkpoint's tokenizer.json when it has one (as the router's model
        card and model/tokenizer.py read it), else the byte vocabulary."""
        path = Path(self.checkpoint) / "tokenizer.json" if self.checkpoint else None
        text = path.read_text() if path is not None and path.is_file() else None
        return Vocabulary(vocab_size=model_config.vocab_size, eos_id=model_config.eos_id, tokenizer_json=text)


def with_prefix_cache(cfg: EngineConfig, args: argparse.Namespace, enabled: bool = True) -> EngineConfig:
    """cfg with the prefix cache the flags ask for (none when not enabled for this process)."""
    if args.prefix_cache_entries < 0:
        raise ValueError(f"--prefix-cache-entries must be ≥ 0, got {args.prefix_cache_entries}")
    if args.prefix_cache_host_bytes < 0:
        raise ValueError(f"--prefix-cache-host-bytes must be ≥ 0, got {args.prefix_cache_host_bytes}")
    entries = args.prefix_cache_entries if enabled and not args.disable_prefix_cache else 0
    host = args.prefix_cache_host_bytes if entries else 0
    return cfg.model_copy(update=dict(pools=cfg.pools.model_copy(
        update=dict(prefix_cache_entries=entries, prefix_cache_host_bytes=host))))


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    num_pages = args.num_pages
    if num_pages is None and args.kv_memory is None and not args.device.startswith("cuda"):
        num_pages = 512
    pools = PoolConfig(num_slots=args.num_slots, max_batch_tokens=args.max_batch_tokens, num_pages=num_pages,
                       kv_memory_bytes=args.kv_memory, gpu_memory_fraction=args.gpu_memory_fraction)
    return EngineConfig(preset=args.preset, checkpoint=args.checkpoint, seed=args.seed, device=args.device,
                        pools=pools, cuda_graph=args.cuda_graph, graph_max_context=args.graph_max_context,
                        prefill_cuda_graph=args.prefill_cuda_graph,
                        overlap=args.overlap, gpu_wait=args.gpu_wait, load=load_options_from_args(args),
                        speculative_num_steps=args.speculative_num_steps)
