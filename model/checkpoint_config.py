"""A checkpoint directory's `config.json` as a `ModelConfig`, and how its weights are stored (docs/DESIGN.md §8).

Two forms. Ours, `{"sparsepd": {...}}`, written by `save_checkpoint`: the ModelConfig fields as they are.
The published DeepSeek-V4 form: the official keys (the names Hugging Face transformers' `deepseek_v4`
config reads, legacy ones included: `compress_ratios`, `num_hash_layers`, `qk_rope_head_dim`,
`rope_scaling`). Each official key is mapped, checked against the one value this architecture supports,
or ignored because serving does not use it (`_IGNORED`); a missing required key or any other key is
refused with the key's name and the file, so a config we would misread never loads.

Mapping notes. `compress_ratios` may be longer than `num_hidden_layers`: the tail belongs to the
multi-token-prediction layers (`mtp.*`), which are not served. `rope_scaling` is YaRN for the compressed
layers (docs/dsv4-spec.md "Configurations"); its `mscale` keys are accepted and unused (the V4 reference does not
scale attention by them). A page is 128 tokens (DeepSeek's block), or the lcm of 128 and the ratios.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from sparsepd.model.config import ModelConfig

PAGE_TOKENS = 128

# Required official keys → ModelConfig fields (integers).
_REQUIRED_INTS = {
    "vocab_size": "vocab_size", "hidden_size": "dim", "num_hidden_layers": "n_layers",
    "num_hash_layers": "n_hash_layers", "num_attention_heads": "n_heads", "head_dim": "head_dim",
    "qk_rope_head_dim": "rope_dim", "q_lora_rank": "q_lora_rank", "o_groups": "o_groups",
    "o_lora_rank": "o_lora_rank", "sliding_window": "window", "index_n_heads": "index_n_heads",
    "index_topk": "index_topk", "n_routed_experts": "n_routed_experts", "num_experts_per_tok": "n_activated_experts",
    "moe_intermediate_size": "moe_inter_dim", "max_position_embeddings": "max_seq_len",
}
_REQUIRED_FLOATS = {"routed_scaling_factor": "route_scale"}
# Optional official keys → fields; when absent, ModelConfig's default (the published value) stands.
_OPTIONAL_INTS = {
    "index_head_dim": "index_head_dim", "n_shared_experts": "n_shared_experts", "hc_mult": "hc_mult",
    "hc_sinkhorn_iters": "hc_sinkhorn_iters", "bos_token_id": "bos_id", "eos_token_id": "eos_id",
}
_OPTIONAL_FLOATS = {
    "swiglu_limit": "swiglu_limit", "hc_eps": "hc_eps", "rms_norm_eps": "norm_eps", "rope_theta": "rope_theta",
    "compress_rope_theta": "compress_rope_theta",
}
# Keys accepted only at the value DeepSeek-V4 has (anything else is another architecture).
_FIXED: dict[str, Any] = {
    "model_type": "deepseek_v4", "num_key_value_heads": 1, "scoring_func": "sqrtsoftplus", "norm_topk_prob": True,
    "topk_method": "noaux_tc", "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
    "first_k_dense_replace": 0,
}
# Keys serving does not need: metadata, training-only settings, the MTP layers.
_IGNORED = frozenset({
    "architectures", "transformers_version", "_name_or_path", "auto_map", "initializer_range", "use_cache",
    "attention_dropout", "pad_token_id", "num_nextn_predict_layers", "n_group", "topk_group",
})
_SPECIAL = frozenset({"compress_ratios", "rope_scaling", "torch_dtype", "dtype", "quantization_config",
                      "expert_dtype"})
_ROPE_KEYS = frozenset({"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast",
                        "beta_slow", "mscale", "mscale_all_dim"})
_QUANT_KEYS = frozenset({"quant_method", "fmt", "activation_scheme", "weight_block_size", "scale_fmt",
                         "expert_dtype"})
_DTYPES = ("bfloat16", "float32")


class CheckpointConfigError(ValueError):
    """A checkpoint's config.json cannot describe a model we serve: names the key and the file."""


@dataclass(frozen=True)
class WeightFormat:
    """How quantized weights are stored: FP8 e4m3 with one scale per `fp8_block` tile, packed FP4 e2m1
    (two values a byte, low nibble first) with one scale per `fp4_block` inputs of a row; `expert_dtype`,
    when the config names it, is what every routed expert's weights must be."""

    fp8_block: tuple[int, int] = (128, 128)
    fp4_block: int = 32
    expert_dtype: Literal["fp4", "fp8"] | None = None


def read_checkpoint_config(directory: str | Path) -> ModelConfig | None:
    """The ModelConfig described by `directory/config.json` (either form); None when there is no config.json."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    data = _load(path)
    try:
        if "sparsepd" in data:
            return ModelConfig(**data["sparsepd"])
        return ModelConfig(**_official_fields(data, path, Path(directory).resolve().name))
    except ValidationError as exc:  # the sizes do not make a model we can build
        reasons = "; ".join(".".join(map(str, e["loc"])) + (": " if e["loc"] else "")
                            + e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise CheckpointConfigError(f"{path}: {reasons}") from None
    except TypeError as exc:  # our own form, but "sparsepd" is not an object
        raise CheckpointConfigError(f"{path}: {exc}") from None


def read_weight_format(directory: str | Path) -> WeightFormat:
    """The weight format `directory/config.json` declares (the defaults for our own form or no config)."""
    path = Path(directory) / "config.json"
    data = _load(path) if path.is_file() else {}
    if "sparsepd" in data or not data:
        return WeightFormat()
    _check_quantization(data, path)
    quant = data.get("quantization_config") or {}
    block = quant.get("weight_block_size", [128, 128])
    expert = quant.get("expert_dtype", data.get("expert_dtype"))
    return WeightFormat(fp8_block=(int(block[0]), int(block[1])), expert_dtype=expert)


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointConfigError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointConfigError(f"{path} holds a {type(data).__name__}, expected a JSON object")
    return data


def _official_fields(data: dict[str, Any], path: Path, name: str) -> dict[str, Any]:
    known = (_REQUIRED_INTS.keys() | _REQUIRED_FLOATS.keys() | _OPTIONAL_INTS.keys() | _OPTIONAL_FLOATS.keys()
             | _FIXED.keys() | _IGNORED | _SPECIAL)
    unknown = sorted(set(data) - known)
    if unknown:
        raise CheckpointConfigError(f"{path}: unknown key {unknown[0]!r} (not a DeepSeek-V4 key sparsepd reads"
                                    + (f"; also {unknown[1:]}" if unknown[1:] else "") + ")")
    for key in [*_REQUIRED_INTS, *_REQUIRED_FLOATS, "compress_ratios"]:
        if key not in data:
            raise CheckpointConfigError(f"{path}: required key {key!r} is missing")
    for key, value in _FIXED.items():
        if key in data and data[key] != value:
            raise CheckpointConfigError(f"{path}: {key}={data[key]!r}, sparsepd serves only {key}={value!r}")
    groups = data.get("n_group", 1)
    if data.get("topk_group", groups) != groups:
        raise CheckpointConfigError(f"{path}: topk_group={data['topk_group']!r} of n_group={groups!r} asks for "
                                    "group-limited routing, which DeepSeek-V4 does not use")
    fields: dict[str, Any] = {"name": name}
    for key, field in {**_REQUIRED_INTS, **_OPTIONAL_INTS}.items():
        if key in data:
            fields[field] = _int(data, key, path)
    for key, field in {**_REQUIRED_FLOATS, **_OPTIONAL_FLOATS}.items():
        if key in data:
            fields[field] = _float(data, key, path)
    fields["compress_ratios"] = _ratios(data, fields["n_layers"], path)
    fields.update(_rope(data.get("rope_scaling"), path))
    fields["dtype"] = _dtype(data, path)
    _check_quantization(data, path)
    ratios = [r for r in fields["compress_ratios"] if r]
    fields["page_size"] = math.lcm(PAGE_TOKENS, *ratios)
    return fields


def _int(data: dict[str, Any], key: str, path: Path, where: str = "") -> int:
    value = data[key]
    if isinstance(value, list) and len(value) == 1 and key == "eos_token_id":
        value = value[0]  # one end-of-sequence token written as a list
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointConfigError(f"{path}: {where}{key}={value!r}, expected an integer")
    return value


def _float(data: dict[str, Any], key: str, path: Path, where: str = "") -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointConfigError(f"{path}: {where}{key}={value!r}, expected a number")
    return float(value)


def _ratios(data: dict[str, Any], n_layers: int, path: Path) -> tuple[int, ...]:
    ratios = data["compress_ratios"]
    if not isinstance(ratios, list) or len(ratios) < n_layers:
        raise CheckpointConfigError(f"{path}: compress_ratios={ratios!r}, expected a list of at least "
                                    f"num_hidden_layers={n_layers} integers")
    head = ratios[:n_layers]  # entries past the layers describe the MTP layers
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in head):
        raise CheckpointConfigError(f"{path}: compress_ratios={head!r}, expected integers ≥ 0 "
                                    "(0 = sliding window only)")
    return tuple(head)


def _rope(scaling: Any, path: Path) -> dict[str, Any]:
    """YaRN settings of the compressed layers; no rope_scaling means plain RoPE there too."""
    if scaling is None:
        return {"rope_factor": 1.0, "original_seq_len": 0}
    if not isinstance(scaling, dict):
        raise CheckpointConfigError(f"{path}: rope_scaling={scaling!r}, expected an object")
    unknown = sorted(set(scaling) - _ROPE_KEYS)
    if unknown:
        raise CheckpointConfigError(f"{path}: unknown key rope_scaling.{unknown[0]} (expected some of "
                                    f"{sorted(_ROPE_KEYS)})")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "yarn":
        raise CheckpointConfigError(f"{path}: rope_scaling type {kind!r}, sparsepd supports 'yarn'")
    for key in ("factor", "original_max_position_embeddings"):
        if key not in scaling:
            raise CheckpointConfigError(f"{path}: required key rope_scaling.{key} is missing")
    out: dict[str, Any] = {"rope_factor": _float(scaling, "factor", path, "rope_scaling."),
                           "original_seq_len": _int(scaling, "original_max_position_embeddings", path, "rope_scaling.")}
    for key in ("beta_fast", "beta_slow"):
        if key in scaling:
            out[key] = _int(scaling, key, path, "rope_scaling.")
    return out


def _dtype(data: dict[str, Any], path: Path) -> str:
    key = "torch_dtype" if "torch_dtype" in data else "dtype"
    value = data.get(key, "bfloat16")
    if value not in _DTYPES:
        raise CheckpointConfigError(f"{path}: {key}={value!r}, expected one of {_DTYPES}")
    return value


def _check_quantization(data: dict[str, Any], path: Path) -> None:
    quant = data.get("quantization_config")
    expert = data.get("expert_dtype")
    if quant is not None:
        if not isinstance(quant, dict):
            raise CheckpointConfigError(f"{path}: quantization_config={quant!r}, expected an object")
        unknown = sorted(set(quant) - _QUANT_KEYS)
        if unknown:
            raise CheckpointConfigError(f"{path}: unknown key quantization_config.{unknown[0]} "
                                        f"(expected some of {sorted(_QUANT_KEYS)})")
        checks = {"quant_method": ("fp8",), "fmt": ("e4m3",), "scale_fmt": ("ue8m0", "float"),
                  "activation_scheme": ("dynamic",)}  # activations are not quantized here (README)
        for key, allowed in checks.items():
            if key in quant and quant[key] not in allowed:
                raise CheckpointConfigError(f"{path}: quantization_config.{key}={quant[key]!r}, "
                                            f"expected one of {allowed}")
        block = quant.get("weight_block_size", [128, 128])
        if (not isinstance(block, list) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise CheckpointConfigError(f"{path}: quantization_config.weight_block_size={block!r}, "
                                        "expected two positive integers")
        expert = quant.get("expert_dtype", expert)
    if expert is not None and expert not in ("fp4", "fp8"):
        raise CheckpointConfigError(f"{path}: expert_dtype={expert!r}, expected 'fp4' or 'fp8'")
