"""Write a quantized copy of a V4 checkpoint in the published layout (FP8 projections with 128×128 ue8m0 tile
scales, routed experts packed FP4 with per-32 ue8m0 scales, `model/quantize.py`), which sparsepd then serves with
its weights kept quantized:

    python3 tools/quantize_checkpoint.py sparsepd/models/v4-byte-demo /tmp/v4-byte-demo-fp8
    sparsepd generate --local --checkpoint /tmp/v4-byte-demo-fp8 --prompt "def fibonacci("

The source is a checkpoint directory whose config.json is the published form (official keys) and whose weights
are plain floats (fp32/bf16/fp16, one or more safetensors shards); the tokenizer files are copied."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from sparsepd.checkpoint_config import read_checkpoint_config, read_weight_format
from sparsepd.model.quantize import quantize_state, quantized_config


def quantize_checkpoint(src: Path, dst: Path, experts: str = "fp4") -> Path:
    """Quantize `src` into `dst` (created; refused if it holds a checkpoint already); returns dst."""
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{src} has no config.json")
    config = json.loads(config_path.read_text())
    if "sparsepd" in config:
        raise ValueError(f"{config_path} is sparsepd's own form: quantize a checkpoint in the published form")
    read_checkpoint_config(src)  # refuses a config the loader would refuse, naming the key
    if read_weight_format(src).quantized:
        raise ValueError(f"{src} is quantized already (its config.json has a quantization_config)")
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{src} holds no *.safetensors")
    if dst.exists() and any(dst.glob("*.safetensors")):
        raise ValueError(f"{dst} holds a checkpoint already: choose an empty or new directory")
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    quantized = quantize_state(tensors, experts)
    save_file({k: v.contiguous() for k, v in quantized.items()}, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(quantized_config(config, experts), indent=1) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="checkpoint directory (published form, plain float weights)")
    p.add_argument("dst", type=Path, help="where the quantized copy goes (a new or empty directory)")
    p.add_argument("--experts", choices=("fp4", "fp8"), default="fp4",
                   help="the routed experts' format (default: %(default)s, as V4 publishes them)")
    args = p.parse_args(argv)
    try:
        out = quantize_checkpoint(args.src, args.dst, args.experts)
    except ValueError as exc:
        print(f"quantize_checkpoint: {exc}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} ({size:,} bytes of weights; FP8 projections, {args.experts.upper()} experts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
