"""The weight flags `--load-format`, `--dtype`, `--num-layers` (what they mean: sparsepd/load_options.py).

In the torch-free floor, with nothing to import, so that every parser that carries them (the workers', the
router's for its fingerprint, serve's, generate's) builds without importing the model package.
"""

from __future__ import annotations

import argparse


def add_load_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("weights")
    g.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                   help="auto: the --checkpoint's weights, else random ones from --seed made on the host; dummy: "
                        "random weights made on the device in the quantized layout, no files read (a checkpoint's "
                        "config.json only), at any preset's size (default: auto)")
    g.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: quantized checkpoints and dummy weights stay FP8 (projections) and FP4 (routed "
                        "experts) in memory; bf16/fp32: every weight dequantized to that dtype, the reference "
                        "path (default: auto)")
    g.add_argument("--num-layers", type=int, default=None, metavar="N",
                   help="only the first N layers of the preset (or config.json), the pattern of layer kinds kept; "
                        "with --load-format dummy or random weights (default: all)")
