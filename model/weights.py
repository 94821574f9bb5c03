"""Weights: deterministic random init from a seed (model/init_rules.py; on the device in the quantized layout:
model/dummy_weights.py), and safetensors checkpoints with the official names.

Checkpoints: a directory of safetensors shards (listed by `model.safetensors.index.json` when there is
one, else every `*.safetensors` file) whose names are the official ones (`layers.{i}.attn.wq_a.weight`, ...),
with a `config.json` in either form `checkpoint_config.py` reads. FP8 e4m3 weights (a `.scale` beside them,
one per 128×128 tile, partial tiles at the edges) and FP4 e2m1 weights (int8, two values a byte, low nibble
first, one scale per 32 inputs) are dequantized on load into the model's dtype, or kept as stored where the
model holds them quantized (its weight_format: FP8 projections with fp32 tile scales, FP4 experts with ue8m0
bytes); scales are float8_e8m0fnu (powers of two) or float32. Multi-token-prediction tensors (`mtp.*`) are not
served and skipped. Anything else that is missing, extra, mis-shaped, of the wrong dtype or without its scale is
refused with its name before any data is read.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sparsepd.checkpoint_config import WeightFormat, read_checkpoint_config, read_weight_format
from sparsepd.model.dummy_weights import init_dummy
from sparsepd.model.init_rules import hc_base, init_rule
from sparsepd.model.linear import ROUTED_EXPERTS
from sparsepd.model.transformer import Transformer
from sparsepd.model_config import ModelConfig

_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


class CheckpointError(ValueError):
    """A checkpoint does not match the model: names the tensor and what was expected."""


def init_random(model: Transformer, seed: int) -> Transformer:
    """Fill every parameter deterministically from `seed` (same seed → bit-identical weights), on the host: a
    model whose weights are all plain (quantized formats: model/dummy_weights.py)."""
    cfg = model.cfg
    if cfg.weight_format != "plain":
        raise ValueError(f"init_random fills plain weights; weight_format={cfg.weight_format!r} takes init_dummy")
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.device("meta"):  # every parameter of the whole model, in one order: a rank holding some of the
        every = sorted((n, tuple(p.shape)) for n, p in Transformer(cfg).named_parameters())  # experts draws alike
    for name, shape in every:
        value = _init_value(cfg, name, shape, gen)
        if name in params:
            with torch.no_grad():
                params[name].copy_(value.to(params[name].dtype))
    return model


def _init_value(cfg: ModelConfig, name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    kind, value = init_rule(cfg, name, shape)
    if kind == "table":
        return torch.rand(shape[0], cfg.n_routed_experts, generator=gen).argsort(-1)[:, : shape[1]]
    if kind == "normal":
        return torch.randn(shape, generator=gen) * value
    if kind == "const":
        return torch.full(shape, value)
    return hc_base(shape[0], cfg.hc_mult)


# --- safetensors --------------------------------------------------------------------------------
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_PLAIN = (torch.float32, torch.bfloat16, torch.float16)
_QUANTIZED = {torch.float8_e4m3fn: "fp8", torch.int8: "fp4", torch.uint8: "fp4"}
_SCALES = (torch.float8_e8m0fnu, torch.float32)
_TABLES = (torch.int32, torch.int64)
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class _Header:
    """One stored tensor as its shard's header describes it (no data read)."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype | str  # safetensors' own name when torch has no such dtype


@dataclass(frozen=True)
class _Plan:
    """How one parameter is read: plainly, dequantized with the scale tensor `scale` (fp8, fp4), or kept as
    stored with its scale (fp8_kept, fp4_kept: the model holds it quantized, model/linear.py and model/moe.py)."""

    name: str
    kind: Literal["plain", "fp8", "fp4", "fp8_kept", "fp4_kept"]
    scale: str | None = None


def save_checkpoint(model: Transformer, directory: str | Path) -> Path:
    """Write `model.safetensors` (official names, the model's dtypes; FP4 scales as e8m0) and `config.json`
    (our preset)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = model.state_dict()
    tensors = {k: v.detach().cpu().clone() for k, v in params.items()}  # clones: some parameters share storage
    for name, kind in _kept(params).items():
        if kind == "fp4_kept":
            scale = name[: -len("weight")] + "scale"
            tensors[scale] = tensors[scale].view(torch.float8_e8m0fnu)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"sparsepd": model.cfg.model_dump(mode="json")}, indent=1))
    return directory


def read_config(directory: str | Path) -> ModelConfig | None:
    """The ModelConfig of a checkpoint's config.json, ours or the published form; None when it has none."""
    return read_checkpoint_config(directory)


def load_checkpoint(model: Transformer, directory: str | Path) -> Transformer:
    """Load every parameter of `model` from the safetensors shards in `directory` (see module docstring).

    Everything is checked from the shards' headers before any data is read; then one shard at a time is
    opened and its tensors are read, dequantized and copied into the parameters one by one, so the host
    holds one checkpoint tensor at a time (besides the model itself).
    """
    directory = Path(directory)
    headers = _read_headers(directory)
    fmt = read_weight_format(directory)
    params = model.state_dict()
    kept = _kept(params)
    kept_scales = {name[: -len("weight")] + "scale" for name in kept}
    plans = [_plan(name, tuple(p.shape), p.dtype, headers, fmt, directory, kept.get(name))
             for name, p in params.items() if name not in kept_scales]
    used = {p.name for p in plans} | {p.scale for p in plans if p.scale}
    elsewhere = _held_elsewhere(model)  # expert parallel: other ranks' experts are not read here
    extra = sorted(k for k in headers if k not in used and not k.startswith("mtp.") and not elsewhere(k))
    if extra:
        raise CheckpointError(f"checkpoint {directory} has {len(extra)} unexpected tensors, e.g. {extra[:5]}")
    by_file: dict[Path, list[_Plan]] = {}
    for plan in plans:
        by_file.setdefault(headers[plan.name].file, []).append(plan)
    with torch.no_grad():
        for file in sorted(by_file):
            with safe_open(str(file), framework="pt") as shard:
                for plan in by_file[file]:
                    for name, value in _read(plan, shard, file, headers, fmt).items():
                        if name.endswith(".tid2eid"):
                            _check_table(name, value, model.cfg.n_routed_experts)
                        params[name].copy_(value)  # into the parameter's storage and dtype
    return model


_EXPERT_NAME = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.")


def _held_elsewhere(model: Transformer):
    """Whether a checkpoint tensor is a routed expert's that this model does not hold (expert parallel: another
    rank of the group reads it)."""
    local = [layer.ffn.local for layer in model.layers]

    def elsewhere(name: str) -> bool:
        m = _EXPERT_NAME.match(name)
        return m is not None and int(m[1]) < len(local) and int(m[2]) not in local[int(m[1])]
    return elsewhere


def _kept(params: dict[str, torch.Tensor]) -> dict[str, str]:
    """The weights the model keeps quantized, by name: FP8 e4m3 ("fp8_kept"), packed FP4 bytes with a uint8
    scale beside them ("fp4_kept")."""
    kept = {}
    for name, p in params.items():
        scale = name[: -len("weight")] + "scale"
        if p.dtype == torch.float8_e4m3fn:
            kept[name] = "fp8_kept"
        elif p.dtype == torch.uint8 and scale in params and params[scale].dtype == torch.uint8:
            kept[name] = "fp4_kept"
    return kept


def _read_headers(directory: Path) -> dict[str, _Header]:
    """Every tensor's shard, shape and dtype: the shards the index names, or every *.safetensors file."""
    index = directory / INDEX_FILE
    weight_map = _read_index(index) if index.is_file() else None
    if weight_map is not None:
        files = sorted({directory / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index} names shard {f.name!r}, which is not in {directory}")
    else:
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files (and no {INDEX_FILE}) in {directory}")
    headers: dict[str, _Header] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as shard:
            for name in shard.keys():
                if weight_map is not None and weight_map.get(name) != f.name:
                    continue  # the index is the authority on where a tensor lives
                if name in headers:
                    raise CheckpointError(f"tensor {name!r} is in both {headers[name].file.name} and {f.name}")
                sl = shard.get_slice(name)
                headers[name] = _Header(f, tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype()))
    for name, file in (weight_map or {}).items():
        if name not in headers:
            raise CheckpointError(f"{index} maps tensor {name!r} to {file}, which lacks it")
    return headers


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text()).get("weight_map")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{path} is not a safetensors index (a JSON object with a weight_map): {exc}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path}: weight_map must map tensor names to shard file names")
    return weight_map


def _plan(name: str, shape: tuple[int, ...], dtype: torch.dtype, headers: dict[str, _Header], fmt: WeightFormat,
          directory: Path, kept: str | None = None) -> _Plan:
    """Check one parameter's stored tensor (and scale) against the model; say how to read it. `kept`: the model
    keeps this weight quantized ("fp8_kept", "fp4_kept"; `shape` is then the stored one)."""
    if name not in headers:
        raise CheckpointError(f"checkpoint {directory} lacks tensor {name!r} (shape {shape})")
    head = headers[name]
    scale = name[: -len("weight")] + "scale" if name.endswith(".weight") else None
    scale_head = headers.get(scale) if scale else None
    if kept is not None:
        return _plan_kept(name, shape, kept, head, scale, scale_head, fmt)
    if not dtype.is_floating_point:  # the hash-routing table
        if head.dtype not in _TABLES:
            raise CheckpointError(f"tensor {name!r} has dtype {head.dtype}, expected int32 or int64")
        return _checked_shape(_Plan(name, "plain"), head.shape, shape)
    expert_kind = fmt.expert_dtype if ROUTED_EXPERTS.search(name) else None
    kind = _QUANTIZED.get(head.dtype)
    if head.dtype in _PLAIN and expert_kind is None:
        if scale_head is not None:
            raise CheckpointError(f"tensor {name!r} is {head.dtype} but has a scale {scale!r} beside it "
                                  "(only FP8 and packed FP4 weights have one)")
        return _checked_shape(_Plan(name, "plain"), head.shape, shape)
    if kind is None or (expert_kind is not None and kind != expert_kind):
        want = (f"{expert_kind} as config.json's expert_dtype says" if expert_kind
                else "bfloat16, float32 or float16, or FP8 e4m3 / packed FP4 (int8) with a .scale")
        raise CheckpointError(f"tensor {name!r} has dtype {head.dtype}, expected {want}")
    if len(shape) != 2:
        raise CheckpointError(f"tensor {name!r} is quantized ({head.dtype}) but the parameter has shape {shape}: "
                              "only 2-D projection weights are stored quantized")
    if scale_head is None:
        raise CheckpointError(f"quantized tensor {name!r} ({head.dtype}) has no {scale!r} beside it")
    if scale_head.dtype not in _SCALES:
        raise CheckpointError(f"scale {scale!r} has dtype {scale_head.dtype}, expected float8_e8m0fnu or float32")
    rows, cols = shape
    stored = shape if kind == "fp8" else (rows, cols // 2 if cols % 2 == 0 else -1)
    plan = _checked_shape(_Plan(name, kind, scale), head.shape, stored)
    block_rows, block_cols = fmt.fp8_block if kind == "fp8" else (1, fmt.fp4_block)
    grid = (math.ceil(rows / block_rows), math.ceil(cols / block_cols))
    if scale_head.shape != grid:
        raise CheckpointError(f"scale {scale!r} has shape {scale_head.shape}, expected {grid}: one scale per "
                              f"{block_rows}×{block_cols} block of the {rows}×{cols} weight {name!r}")
    return plan


def _plan_kept(name: str, shape: tuple[int, ...], kept: str, head: _Header, scale: str | None,
               scale_head: _Header | None, fmt: WeightFormat) -> _Plan:
    """A weight the model keeps quantized must be stored so: FP8 e4m3 in 128×128 tiles, or packed FP4 with one
    power-of-two scale per 32 inputs; its scale beside it."""
    want = "fp8" if kept == "fp8_kept" else "fp4"
    if _QUANTIZED.get(head.dtype) != want:
        what = "FP8 e4m3 with a .scale" if want == "fp8" else "packed FP4 (int8/uint8) with a .scale"
        raise CheckpointError(f"tensor {name!r} is stored as {head.dtype}, but the model keeps it as {what} "
                              "(weight_format fp8/fp8_fp4); --dtype bf16 loads every weight dequantized")
    if scale_head is None:
        raise CheckpointError(f"quantized tensor {name!r} ({head.dtype}) has no {scale!r} beside it")
    if scale_head.dtype not in _SCALES:
        raise CheckpointError(f"scale {scale!r} has dtype {scale_head.dtype}, expected float8_e8m0fnu or float32")
    if want == "fp8" and fmt.fp8_block != (128, 128):
        raise CheckpointError(f"tensor {name!r}: FP8 tiles of {fmt.fp8_block}; the FP8 GEMM takes 128×128 tiles "
                              "(--dtype bf16 dequantizes them instead)")
    plan = _checked_shape(_Plan(name, kept, scale), head.shape, shape)
    rows, cols = shape
    grid = (math.ceil(rows / 128), math.ceil(cols / 128)) if want == "fp8" else (rows, cols * 2 // fmt.fp4_block)
    if scale_head.shape != grid:
        raise CheckpointError(f"scale {scale!r} has shape {scale_head.shape}, expected {grid} for the "
                              f"{'FP8' if want == 'fp8' else 'packed FP4'} weight {name!r} of shape {shape}")
    return plan


def _checked_shape(plan: _Plan, stored: tuple[int, ...], expected: tuple[int, ...]) -> _Plan:
    if stored != expected:
        packed = " (packed FP4: two values a byte)" if plan.kind in ("fp4", "fp4_kept") else ""
        raise CheckpointError(f"tensor {plan.name!r} has shape {stored}, expected {expected}{packed}")
    return plan


def _read(plan: _Plan, shard, file: Path, headers: dict[str, _Header], fmt: WeightFormat) -> dict[str, torch.Tensor]:
    """The parameters `plan` fills, by name: its tensor, dequantized to fp32 when the model holds it plain but it
    is stored quantized; or kept as stored together with its scale (its scale may sit in another shard)."""
    def get(name: str) -> torch.Tensor:
        if headers[name].file == file:
            return shard.get_tensor(name)
        with safe_open(str(headers[name].file), framework="pt") as other:
            return other.get_tensor(name)

    value = get(plan.name)
    if plan.kind == "plain":
        return {plan.name: value}
    if plan.kind == "fp8_kept":
        return {plan.name: value, plan.scale: get(plan.scale).float()}  # e8m0 → fp32 is exact
    if plan.kind == "fp4_kept":
        return {plan.name: value.view(torch.uint8), plan.scale: _exponent_bytes(get(plan.scale), plan.scale)}
    scale = get(plan.scale).float()  # e8m0 → fp32 is exact
    if plan.kind == "fp8":
        w, (block_rows, block_cols) = value.float(), fmt.fp8_block
    else:
        w, (block_rows, block_cols) = _unpack_fp4(value), (1, fmt.fp4_block)
    rows, cols = w.shape
    full = scale.repeat_interleave(block_rows, 0)[:rows].repeat_interleave(block_cols, 1)[:, :cols]
    return {plan.name: w * full}  # exact: a power-of-two scale times an FP8/FP4 value fits bf16 and fp32


def _exponent_bytes(scale: torch.Tensor, name: str) -> torch.Tensor:
    """Scales as ue8m0 bytes (2^(byte − 127)): e8m0 as stored; fp32 ones must be powers of two in e8m0's range."""
    if scale.dtype == torch.float8_e8m0fnu:
        return scale.view(torch.uint8)
    mantissa, exponent = torch.frexp(scale.float())
    biased = exponent.to(torch.int32) - 1 + 127  # scale = 0.5 · 2^exponent
    bad = (mantissa != 0.5) | (biased < 0) | (biased > 254)
    if bad.any():
        at = tuple(int(i) for i in bad.nonzero()[0])
        raise CheckpointError(f"scale {name!r} holds {float(scale[at])!r} at {at}: the FP4 experts keep ue8m0 "
                              "scales (powers of two from 2^-127 to 2^127); --dtype bf16 dequantizes them instead")
    return biased.to(torch.uint8)


def _check_table(name: str, table: torch.Tensor, n_experts: int) -> None:
    low, high = int(table.min()), int(table.max())
    if low < 0 or high >= n_experts:
        raise CheckpointError(f"tensor {name!r} holds expert ids in [{low}, {high}], expected [0, {n_experts})")


def _unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """int8 `[out, in/2]`, two e2m1 codes per byte (low nibble = even column) → fp32 `[out, in]`."""
    b = packed.view(torch.uint8).to(torch.int64)
    table = torch.tensor(_E2M1)
    return torch.stack([table[b & 0xF], table[b >> 4]], dim=-1).flatten(-2)


def build_model(cfg: ModelConfig, seed: int = 0, checkpoint: str | Path | None = None,
                device: str | torch.device = "cpu", load_format: Literal["auto", "dummy"] = "auto",
                experts: range | None = None) -> Transformer:
    """A model on `device`, built there (no host copy of its weights): loaded from `checkpoint`, or random from
    `seed` (load_format "dummy", or a quantized weight format: made on the device, model/dummy_weights.py; else
    made on the host, `init_random`). With "dummy" a checkpoint's weights are not read. `experts`: the routed
    experts this process holds (expert parallel: the others' tensors are neither made nor read)."""
    with torch.device(device):
        model = Transformer(cfg, experts)
    if load_format == "dummy" or (checkpoint is None and cfg.weight_format != "plain"):
        init_dummy(model, seed)
    elif checkpoint is not None:
        load_checkpoint(model, checkpoint)
    else:
        init_random(model, seed)
    return model.to(device).eval()
