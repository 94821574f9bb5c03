"""A checkpoint directory's `config.json` as a `ModelConfig`, and how its weights are stored (docs/DESIGN.md §8).

Two forms. Ours, `{"sparsepd": {...}}`, written by `save_checkpoint`: the ModelConfig fields as they are.
The published DeepSeek-V4 form: the official keys, in either spelling Hugging Face transformers' `deepseek_v4`
config reads: the published one (`compress_ratios`, `num_hash_layers`, `qk_rope_head_dim`, `rope_scaling`) or
the one transformers 5 writes when it saves a V4 config (`layer_types` + `compress_rates`, `mlp_layer_types`,
`partial_rotary_factor`, `rope_parameters` with `main`/`compress` entries, `dtype`). Each key is mapped,
checked against the one value this architecture supports, or ignored because serving does not use it
(`_IGNORED`: metadata and training-only settings); both spellings of one setting must agree; a missing
required key or any other key is refused with the key's name and the file, so a config we would misread
never loads.

Mapping notes. `compress_ratios` (and `layer_types`) may be longer than `num_hidden_layers`: the tail belongs
to the multi-token-prediction layers (`mtp.*`), which are not served. `rope_scaling` (`rope_parameters`'
`compress` entry) is YaRN for the compressed layers (docs/dsv4-spec.md "Configurations"); its `mscale` keys are
accepted and unused, and an `attention_factor` must be 1 (the V4 reference does not scale attention by
YaRN's factor). A page is 128 tokens (DeepSeek's block), or the lcm of 128 and the ratios.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from sparsepd.model_config import ModelConfig

PAGE_TOKENS = 128

# Required official keys → ModelConfig fields (integers).
_REQUIRED_INTS = {
    "vocab_size": "vocab_size", "hidden_size": "dim", "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads", "head_dim": "head_dim", "q_lora_rank": "q_lora_rank", "o_groups": "o_groups",
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
    "first_k_dense_replace": 0, "mlp_bias": False,
}
# Keys serving does not need: metadata, training-only settings, the MTP layers.
_IGNORED = frozenset({
    "architectures", "transformers_version", "_name_or_path", "auto_map", "initializer_range", "use_cache",
    "attention_dropout", "pad_token_id", "num_nextn_predict_layers", "n_group", "topk_group",
    "output_router_logits", "router_aux_loss_coef", "router_jitter_noise", "output_attentions",
    "output_hidden_states", "return_dict", "id2label", "label2id", "tokenizer_class",
})
# Keys read by a function of their own (several spellings of one setting, nested objects).
_SPECIAL = frozenset({"compress_ratios", "layer_types", "compress_rates", "num_hash_layers", "mlp_layer_types",
                      "qk_rope_head_dim", "partial_rotary_factor", "rope_scaling", "rope_parameters", "torch_dtype",
                      "dtype", "quantization_config", "expert_dtype"})
_YARN_KEYS = frozenset({"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast",
                        "beta_slow", "mscale", "mscale_all_dim", "attention_factor"})
# transformers' names of the attention kinds (`layer_types`) and of the MoE kinds (`mlp_layer_types`).
_SWA, _CSA, _HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
_DEFAULT_RATES = {_CSA: 4, _HCA: 128}  # what transformers assumes when compress_rates is absent
_QUANT_KEYS = frozenset({"quant_method", "fmt", "activation_scheme", "weight_block_size", "scale_fmt",
                         "expert_dtype"})
_DTYPES = ("bfloat16", "float32")


class CheckpointConfigError(ValueError):
    """A checkpoint's config.json cannot describe a model we serve: names the key and the file."""


@dataclass(frozen=True)
class WeightFormat:
    """How quantized weights are stored: FP8 e4m3 with one scale per `fp8_block` tile, packed FP4 e2m1
    (two values a byte, low nibble first) with one scale per `fp4_block` inputs of a row; `expert_dtype`,
    when the config names it, is what every routed expert's weights must be; `quantized`: the config has a
    quantization_config (the projections are stored FP8)."""

    fp8_block: tuple[int, int] = (128, 128)
    fp4_block: int = 32
    expert_dtype: Literal["fp4", "fp8"] | None = None
    quantized: bool = False


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
    return WeightFormat(fp8_block=(int(block[0]), int(block[1])), expert_dtype=expert,
                        quantized="quantization_config" in data)


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
    for key in [*_REQUIRED_INTS, *_REQUIRED_FLOATS]:
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
    n_layers = fields["n_layers"]
    fields["compress_ratios"] = _agree(path, "'compress_ratios' (or 'layer_types')", _ratios(data, n_layers, path),
                                       _layer_kinds(data, n_layers, path))
    hash_layers = ("num_hash_layers", _int(data, "num_hash_layers", path)) if "num_hash_layers" in data else None
    fields["n_hash_layers"] = _agree(path, "'num_hash_layers' (or 'mlp_layer_types')", hash_layers,
                                     _mlp_kinds(data, n_layers, path))
    fields["rope_dim"] = _rope_dim(data, fields["head_dim"], path)
    fields.update(_rope(data, path))
    fields["dtype"] = _dtype(data, path)
    _check_quantization(data, path)
    ratios = [r for r in fields["compress_ratios"] if r]
    fields["page_size"] = math.lcm(PAGE_TOKENS, *ratios)
    return fields


def _agree(path: Path, required: str, *spellings: tuple[str, Any] | None) -> Any:
    """The value of a setting config.json may spell several ways ((key, value) each, None when absent): at least
    one present (else the error names `required`), all present ones equal."""
    given = [s for s in spellings if s is not None]
    if not given:
        raise CheckpointConfigError(f"{path}: required key {required} is missing")
    key, value = given[0]
    for other_key, other in given[1:]:
        if other != value:
            raise CheckpointConfigError(f"{path}: {key} says {value!r} but {other_key} says {other!r}")
    return value


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


def _ratios(data: dict[str, Any], n_layers: int, path: Path) -> tuple[str, tuple[int, ...]] | None:
    """("compress_ratios", one ratio per layer) from the published key; None when absent."""
    if "compress_ratios" not in data:
        return None
    ratios = data["compress_ratios"]
    if not isinstance(ratios, list) or len(ratios) < n_layers:
        raise CheckpointConfigError(f"{path}: compress_ratios={ratios!r}, expected a list of at least "
                                    f"num_hidden_layers={n_layers} integers")
    head = ratios[:n_layers]  # entries past the layers describe the MTP layers
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in head):
        raise CheckpointConfigError(f"{path}: compress_ratios={head!r}, expected integers ≥ 0 "
                                    "(0 = sliding window only)")
    return "compress_ratios", tuple(head)


def _layer_kinds(data: dict[str, Any], n_layers: int, path: Path) -> tuple[str, tuple[int, ...]] | None:
    """("layer_types", one ratio per layer) from transformers' `layer_types` and `compress_rates`; None when
    layer_types is absent (compress_rates alone says nothing about the layers)."""
    rates = data.get("compress_rates", _DEFAULT_RATES)
    if not isinstance(rates, dict) or set(rates) - {_CSA, _HCA}:
        raise CheckpointConfigError(f"{path}: compress_rates={rates!r}, expected an object with keys {_CSA!r} "
                                    f"and {_HCA!r}")
    rates = {**_DEFAULT_RATES, **rates}
    if rates[_CSA] != 4:  # the overlapping ratio-4 compressor and the indexer are what CSA means here
        raise CheckpointConfigError(f"{path}: compress_rates.{_CSA}={rates[_CSA]!r}, sparsepd's CSA layers "
                                    "compress 4 tokens an entry")
    hca = rates[_HCA]
    if isinstance(hca, bool) or not isinstance(hca, int) or hca <= 0 or hca == 4:
        raise CheckpointConfigError(f"{path}: compress_rates.{_HCA}={hca!r}, expected a positive integer other "
                                    "than 4")
    if "layer_types" not in data:
        return None
    kinds = data["layer_types"]
    if not isinstance(kinds, list) or len(kinds) < n_layers:
        raise CheckpointConfigError(f"{path}: layer_types={kinds!r}, expected a list of at least "
                                    f"num_hidden_layers={n_layers} attention kinds")
    ratio = {_SWA: 0, _CSA: 4, _HCA: hca}
    bad = [k for k in kinds[:n_layers] if k not in ratio]
    if bad:
        raise CheckpointConfigError(f"{path}: layer_types has {bad[0]!r}, expected one of {sorted(ratio)}")
    return "layer_types", tuple(ratio[k] for k in kinds[:n_layers])


def _mlp_kinds(data: dict[str, Any], n_layers: int, path: Path) -> tuple[str, int] | None:
    """("mlp_layer_types", the number of hash-routed layers): hash_moe layers first, then moe; None when absent."""
    if "mlp_layer_types" not in data:
        return None
    kinds = data["mlp_layer_types"]
    if not isinstance(kinds, list) or len(kinds) < n_layers or set(kinds[:n_layers]) - {"hash_moe", "moe"}:
        raise CheckpointConfigError(f"{path}: mlp_layer_types={kinds!r}, expected a list of at least "
                                    f"num_hidden_layers={n_layers} entries 'hash_moe' or 'moe'")
    n_hash = kinds[:n_layers].count("hash_moe")
    if kinds[:n_hash] != ["hash_moe"] * n_hash:
        raise CheckpointConfigError(f"{path}: mlp_layer_types={kinds[:n_layers]!r}: sparsepd routes by hash only "
                                    "in the first layers (every 'hash_moe' before every 'moe')")
    return "mlp_layer_types", n_hash


def _rope_dim(data: dict[str, Any], head_dim: int, path: Path) -> int:
    """Rotary dims from `qk_rope_head_dim` or transformers' `partial_rotary_factor` (of head_dim)."""
    by_factor = None
    if "partial_rotary_factor" in data:
        dims = _float(data, "partial_rotary_factor", path) * head_dim
        if abs(dims - round(dims)) > 1e-6 * head_dim:
            raise CheckpointConfigError(f"{path}: partial_rotary_factor={data['partial_rotary_factor']!r} of "
                                        f"head_dim={head_dim} is not a whole number of dims")
        by_factor = ("partial_rotary_factor", round(dims))
    given = ("qk_rope_head_dim", _int(data, "qk_rope_head_dim", path)) if "qk_rope_head_dim" in data else None
    return _agree(path, "'qk_rope_head_dim' (or 'partial_rotary_factor')", given, by_factor)


def _rope(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """rope_theta, compress_rope_theta and YaRN of the compressed layers, from `rope_scaling` (the compressed
    layers' YaRN) and/or transformers' `rope_parameters` (`{"main": ..., "compress": ...}`, or a flat object
    read as rope_scaling); both spellings must agree. Neither: plain RoPE on the compressed layers too."""
    out: dict[str, Any] = {}
    spellings = []
    if "rope_scaling" in data:
        spellings.append(("rope_scaling", _yarn(data["rope_scaling"], "rope_scaling", path)))
    params = data.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise CheckpointConfigError(f"{path}: rope_parameters={params!r}, expected an object")
        if "main" in params or "compress" in params:
            spellings.append(("rope_parameters.compress", _nested_rope(data, params, path, out)))
        else:
            flat = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
            _same(data, params, "rope_theta", "rope_theta", "rope_parameters.", path)
            _same(data, params, "partial_rotary_factor", "partial_rotary_factor", "rope_parameters.", path)
            spellings.append(("rope_parameters", _yarn(flat or None, "rope_parameters", path)))
    out.update(_agree(path, "'rope_scaling'", *spellings) if spellings else _yarn(None, "rope_scaling", path))
    return out


def _nested_rope(data: dict[str, Any], params: dict[str, Any], path: Path, out: dict[str, Any]) -> dict[str, Any]:
    """transformers' nested form: `main` is plain RoPE (its theta = rope_theta); `compress` holds
    compress_rope_theta and the compressed layers' scaling. Fills `out` with the thetas; returns the YaRN fields."""
    extra = sorted(set(params) - {"main", "compress"})
    if extra:
        raise CheckpointConfigError(f"{path}: unknown key rope_parameters.{extra[0]} (expected 'main' and "
                                    "'compress')")
    for part in ("main", "compress"):
        if not isinstance(params.get(part), dict):
            raise CheckpointConfigError(f"{path}: rope_parameters.{part}={params.get(part)!r}, expected an object")
    main, compress = params["main"], params["compress"]
    bad = sorted(set(main) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"})
    if bad:
        raise CheckpointConfigError(f"{path}: unknown key rope_parameters.main.{bad[0]} (the sliding-window layers "
                                    "use plain RoPE)")
    kind = main.get("rope_type", main.get("type", "default"))
    if kind != "default":
        raise CheckpointConfigError(f"{path}: rope_parameters.main.rope_type={kind!r}, sparsepd's sliding-window "
                                    "layers use plain RoPE ('default')")
    for part, block, field, key in (("main", main, "rope_theta", "rope_theta"),
                                    ("compress", compress, "compress_rope_theta", "compress_rope_theta")):
        if "rope_theta" in block:
            value = _float(block, "rope_theta", path, f"rope_parameters.{part}.")
            _same(data, block, key, "rope_theta", f"rope_parameters.{part}.", path)
            out[field] = value
        _same(data, block, "partial_rotary_factor", "partial_rotary_factor", f"rope_parameters.{part}.", path)
    scaling = {k: v for k, v in compress.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        extra = sorted(set(scaling) - {"rope_type", "type"})
        if extra:
            raise CheckpointConfigError(f"{path}: rope_parameters.compress.{extra[0]} with plain RoPE ('default')")
        return _yarn(None, "rope_parameters.compress", path)
    return _yarn(scaling, "rope_parameters.compress", path)


def _same(data: dict[str, Any], block: dict[str, Any], top_key: str, key: str, where: str, path: Path) -> None:
    """A value repeated inside a rope block must equal the top-level key's, when both are given."""
    if key in block and top_key in data and _float(block, key, path, where) != _float(data, top_key, path):
        raise CheckpointConfigError(f"{path}: {where}{key}={block[key]!r} but {top_key}={data[top_key]!r}")


def _yarn(scaling: Any, where: str, path: Path) -> dict[str, Any]:
    """YaRN settings of the compressed layers; None means plain RoPE there too."""
    if scaling is None:
        return {"rope_factor": 1.0, "original_seq_len": 0}
    if not isinstance(scaling, dict):
        raise CheckpointConfigError(f"{path}: {where}={scaling!r}, expected an object")
    unknown = sorted(set(scaling) - _YARN_KEYS)
    if unknown:
        raise CheckpointConfigError(f"{path}: unknown key {where}.{unknown[0]} (expected some of "
                                    f"{sorted(_YARN_KEYS)})")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "yarn" or scaling.get("type", kind) != kind:
        raise CheckpointConfigError(f"{path}: {where} type {kind!r}, sparsepd supports 'yarn'")
    for key in ("factor", "original_max_position_embeddings"):
        if key not in scaling:
            raise CheckpointConfigError(f"{path}: required key {where}.{key} is missing")
    if "attention_factor" in scaling and _float(scaling, "attention_factor", path, f"{where}.") != 1.0:
        raise CheckpointConfigError(f"{path}: {where}.attention_factor={scaling['attention_factor']!r}, DeepSeek-V4 "
                                    "does not scale attention by YaRN's factor (expected 1.0)")
    out: dict[str, Any] = {"rope_factor": _float(scaling, "factor", path, f"{where}."),
                           "original_seq_len": _int(scaling, "original_max_position_embeddings", path, f"{where}.")}
    for key in ("beta_fast", "beta_slow"):
        if key in scaling:
            out[key] = _int(scaling, key, path, f"{where}.")
    return out


def _dtype(data: dict[str, Any], path: Path) -> str:
    given = [(k, data[k]) for k in ("torch_dtype", "dtype") if k in data]
    for key, value in given:
        if value not in _DTYPES:
            raise CheckpointConfigError(f"{path}: {key}={value!r}, expected one of {_DTYPES}")
    return _agree(path, "'dtype'", *given) if given else "bfloat16"


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
