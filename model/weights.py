"""Weights: deterministic random init from a seed, and safetensors checkpoints with the official names.

Random init keeps activations O(1) through every layer (tests assert it): projections are scaled by
1/sqrt(fan_in), the hyper-connection mixes start near "average the copies in, write the output once",
and output projections are shrunk by 1/sqrt(2·n_layers) so the residual stream does not grow with depth.

Checkpoints: a directory of `*.safetensors` files (one or sharded) whose names are the official ones
(`layers.{i}.attn.wq_a.weight`, ...). FP8 e4m3 weights with a `.scale` beside them (128×128 blocks) and
FP4 e2m1 expert weights (int8, two values per byte, low nibble first, 1×32 blocks) are dequantized on
load. Multi-token-prediction tensors (`mtp.*`) are optional for serving and skipped. Anything else that
is missing, extra or mis-shaped is refused with its name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sparsepd.model.config import ModelConfig
from sparsepd.model.transformer import Transformer

_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


class CheckpointError(ValueError):
    """A checkpoint does not match the model: names the tensor and what was expected."""


def init_random(model: Transformer, seed: int) -> Transformer:
    """Fill every parameter deterministically from `seed` (same seed → bit-identical weights)."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    out_shrink = 1.0 / math.sqrt(2 * cfg.n_layers)
    for name, p in sorted(model.named_parameters()):
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        value = _init_value(cfg, name, leaf, parent, tuple(p.shape), gen, out_shrink)
        with torch.no_grad():
            p.copy_(value.to(p.dtype))
    return model


def _normal(shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


def _init_value(cfg: ModelConfig, name: str, leaf: str, parent: str, shape: tuple[int, ...],
                gen: torch.Generator, out_shrink: float) -> torch.Tensor:
    hc = cfg.hc_mult
    if leaf == "tid2eid":
        return torch.rand(shape[0], cfg.n_routed_experts, generator=gen).argsort(-1)[:, : shape[1]]
    if leaf == "attn_sink":
        return _normal(shape, 1.0, gen)
    if leaf == "ape":
        return _normal(shape, 0.1, gen)
    if leaf == "bias":
        return _normal(shape, 0.1, gen)
    if leaf.endswith("_fn"):
        return _normal(shape, 0.5 / math.sqrt(shape[1]), gen)
    if leaf.endswith("_scale"):
        return torch.full(shape, 0.5)
    if leaf.endswith("_base"):
        return _hc_base(shape[0], hc)
    if parent.endswith("norm") or leaf == "norm":
        return torch.ones(shape)
    if name == "embed.weight":
        return _normal(shape, 1.0, gen)
    std = 1.0 / math.sqrt(shape[-1])
    if parent in ("wo_b", "w2"):
        std *= out_shrink
    return _normal(shape, std, gen)


def _hc_base(mix: int, hc: int) -> torch.Tensor:
    """pre ≈ 1/hc (average the copies), post ≈ 1, comb ≈ identity; the head's base: pre ≈ 1/hc."""
    base = torch.zeros(mix)
    base[:hc] = math.log(1.0 / (hc - 1)) if hc > 1 else 0.0  # sigmoid(b) = 1/hc
    if mix > hc:
        base[2 * hc:] = (torch.eye(hc) * 4.0).flatten()
    return base


# --- safetensors --------------------------------------------------------------------------------
def save_checkpoint(model: Transformer, directory: str | Path) -> Path:
    """Write `model.safetensors` (official names, the model's dtypes) and `config.json` (our preset)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"sparsepd": model.cfg.model_dump(mode="json")}, indent=1))
    return directory


def read_config(directory: str | Path) -> ModelConfig | None:
    """The ModelConfig saved beside a checkpoint by `save_checkpoint`, if there is one."""
    path = Path(directory) / "config.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return ModelConfig(**data["sparsepd"]) if "sparsepd" in data else None


def load_checkpoint(model: Transformer, directory: str | Path) -> Transformer:
    """Load every parameter of `model` from the safetensors files in `directory` (see module docstring)."""
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {directory}")
    raw: dict[str, torch.Tensor] = {}
    for f in files:
        raw.update(load_file(str(f)))
    expected = model.state_dict()
    used: set[str] = set()
    loaded: dict[str, torch.Tensor] = {}
    for name, target in expected.items():
        if name not in raw:
            raise CheckpointError(f"checkpoint {directory} lacks tensor {name!r} (shape {tuple(target.shape)})")
        value = _dequantize(name, raw, used)
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        loaded[name] = value.to(target.dtype)
        used.add(name)
    extra = sorted(k for k in raw if k not in used and not k.startswith("mtp."))
    if extra:
        raise CheckpointError(f"checkpoint {directory} has {len(extra)} unexpected tensors, e.g. {extra[:5]}")
    model.load_state_dict(loaded, strict=True)
    return model


def _dequantize(name: str, raw: dict[str, torch.Tensor], used: set[str]) -> torch.Tensor:
    value = raw[name]
    scale_name = name[: -len("weight")] + "scale" if name.endswith(".weight") else None
    if scale_name is None or scale_name not in raw:
        if value.dtype in (torch.float8_e4m3fn, torch.int8):
            raise CheckpointError(f"quantized tensor {name!r} ({value.dtype}) has no {scale_name!r} beside it")
        return value
    used.add(scale_name)
    scale = raw[scale_name].float()
    if value.dtype == torch.float8_e4m3fn:
        return _dequant_blocks(name, value.float(), scale)
    if value.dtype in (torch.int8, torch.uint8):
        return _dequant_blocks(name, _unpack_fp4(value), scale)
    raise CheckpointError(f"tensor {name!r} has a scale but dtype {value.dtype} (expected FP8 or packed FP4)")


def _dequant_blocks(name: str, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w `[out, in]` times its block scale `[ceil(out/bo), ceil(in/bi)]`, block sizes inferred."""
    out_dim, in_dim = w.shape
    rows, cols = scale.shape
    block_out, block_in = math.ceil(out_dim / rows), math.ceil(in_dim / cols)
    if math.ceil(out_dim / block_out) != rows or math.ceil(in_dim / block_in) != cols:
        raise CheckpointError(f"scale of {name!r} has shape {tuple(scale.shape)}, not a block grid of {tuple(w.shape)}")
    full = scale.repeat_interleave(block_out, 0)[:out_dim].repeat_interleave(block_in, 1)[:, :in_dim]
    return w * full


def _unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """int8 `[out, in/2]`, two e2m1 codes per byte (low nibble = even column) → fp32 `[out, in]`."""
    b = packed.view(torch.uint8).to(torch.int64)
    table = torch.tensor(_E2M1)
    return torch.stack([table[b & 0xF], table[b >> 4]], dim=-1).flatten(-2)


def build_model(cfg: ModelConfig, seed: int = 0, checkpoint: str | Path | None = None,
                device: str | torch.device = "cpu") -> Transformer:
    """A model with random weights from `seed`, or loaded from `checkpoint`, on `device`."""
    model = Transformer(cfg)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    else:
        init_random(model, seed)
    return model.to(device).eval()
