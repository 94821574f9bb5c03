"""Where a process's weights come from and how they are held: `--load-format`, `--dtype`, `--num-layers`.

- load_format "auto": the checkpoint when one is given, else random weights from the seed (made on the host,
  every weight in the model's dtype: the CPU tests' model). "dummy": random weights made on the device directly
  in the model's weight format, no files read (a checkpoint's config.json only, when one is given), so any
  preset's dimensions can be measured without its checkpoint (model/dummy_weights.py).
- dtype "auto": a quantized checkpoint and dummy weights stay quantized (FP8 projections, FP4 routed experts
  where the dims allow: `quantized_format`); otherwise the model's own dtype. "bf16" / "fp32": every weight
  dequantized to that dtype (the reference path).
- num_layers: the preset's (or config.json's) first N layers, the published pattern of layer kinds kept
  (`with_num_layers`); not with checkpoint weights, whose other layers would be left unread.

In the torch-free floor: the router resolves the same ModelConfig to compute the deployment's fingerprint
(sparsepd/fingerprint.py).
"""

from __future__ import annotations

import argparse
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sparsepd.checkpoint_config import read_checkpoint_config, read_weight_format
from sparsepd.load_flags import add_load_args  # noqa: F401  (re-exported)
from sparsepd.model_config import ModelConfig, get_preset, quantized_format, with_num_layers

_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


class LoadOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    load_format: Literal["auto", "dummy"] = "auto"
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    num_layers: int | None = Field(None, ge=1)


def resolve_model_config(preset: str, checkpoint: str | None, options: LoadOptions | None = None) -> ModelConfig:
    """The model a process builds: the checkpoint's config.json when it has one, else the preset; cut to
    num_layers; with the weight format and dtype the options ask for (module docstring)."""
    options = options or LoadOptions()
    cfg = (read_checkpoint_config(checkpoint) if checkpoint else None) or get_preset(preset)
    if options.num_layers is not None:
        if checkpoint is not None and options.load_format != "dummy":
            raise ValueError(f"--num-layers {options.num_layers} with the weights of {checkpoint}: the other layers "
                             "would be left unread; add --load-format dummy (random weights, its config.json)")
        cfg = with_num_layers(cfg, options.num_layers)
    if options.dtype != "auto":
        return cfg.model_copy(update={"weight_format": "plain", "dtype": _DTYPES[options.dtype]})
    if options.load_format == "dummy":
        return cfg.model_copy(update={"weight_format": quantized_format(cfg)})
    if checkpoint is not None and cfg.weight_format == "plain":
        stored = read_weight_format(checkpoint)
        if stored.quantized:  # FP4 experts stay FP4 only when the checkpoint's are (else they are dequantized)
            fmt = quantized_format(cfg) if stored.expert_dtype == "fp4" else "fp8"
            return cfg.model_copy(update={"weight_format": fmt})
    return cfg


def load_options_from_args(args: argparse.Namespace) -> LoadOptions:
    return LoadOptions(load_format=args.load_format, dtype=args.dtype, num_layers=args.num_layers)


def load_flags(options: LoadOptions) -> list[str]:
    """The command-line flags that give `options` to another process (serve → router and workers)."""
    flags = ["--load-format", options.load_format, "--dtype", options.dtype]
    return flags + (["--num-layers", str(options.num_layers)] if options.num_layers is not None else [])
