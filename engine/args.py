"""The flags of a process that runs the engine (model, memory, prefix cache): the same on every worker.

Torch-free, so that a worker's argument parser builds without loading the model (`sparsepd --help`, the
deploy layer's subcommand table); engine/config.py turns the parsed flags into an `EngineConfig`.
"""

from __future__ import annotations

import argparse

from sparsepd.gpu_wait import GPU_WAIT_HELP, GPU_WAITS
from sparsepd.load_flags import add_load_args


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
    g.add_argument("--prefill-cuda-graph", action="store_true",
                   help="forwards of a few prompt chunks (up to 8 chunks of ≤ 512 tokens, 1024 rows; no prefix-cache "
                        "boundary snapshot) replay CUDA graphs captured on first use instead of launching every "
                        "layer's kernels from Python: short prompts beside a running batch, cached prompts' last "
                        "tokens (GPU only; off by default until measured to help)")
    g.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="read each step's tokens before launching the next (no host/device overlap; debugging)")
    g.add_argument("--gpu-wait", choices=GPU_WAITS, default="spin", help=GPU_WAIT_HELP + " (default: %(default)s)")
    g.add_argument("--graph-max-context", type=int, default=8192,
                   help="decode graphs captured at start cover contexts up to this many tokens; longer ones "
                        "are captured on first use (default: 8192)")
    g.add_argument("--speculative-num-steps", type=int, default=0, metavar="K",
                   help="speculative decoding: the checkpoint's MTP layer drafts K tokens per decoding request and one "
                        "forward verifies them (decode steps without overlap; CUDA graphs unless --no-cuda-graph); "
                        "0 = off (default: 0)")
    add_load_args(p)


def add_prefix_cache_args(p: argparse.ArgumentParser, who: str = "") -> None:
    c = p.add_argument_group("prefix cache (engine/prefix_cache.py)" + (f": {who}" if who else ""))
    c.add_argument("--prefix-cache-entries", type=int, default=256,
                   help="boundary snapshots kept on the device for later requests that share a page-aligned prefix "
                        "(restore points of the radix tree, whose nodes hold their pages shared); each the SWA window "
                        "and the CSA carry rows (0.38 MB on bench), counted in the memory plan (default: %(default)s)")
    c.add_argument("--prefix-cache-host-bytes", type=int, default=0,
                   help="host memory (pinned on a GPU) for the prefix cache's snapshots and pages evicted from the "
                        "device, copied back on a hit; retracted requests' states share this bound and evict the "
                        "tier's entries first (--max-retracted-memory then caps their part); 0 = no host tier "
                        "(default: %(default)s)")
    c.add_argument("--disable-prefix-cache", action="store_true",
                   help="no prefix cache: every request is prefilled from its first token")
