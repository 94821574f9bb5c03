"""The `sparsepd` command: one console script, one subcommand per role (DESIGN.md §2)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from sparsepd import __version__


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate text: a client of a running router, or in one process with --local",
        description="With TEXT: a client of a running router (`sparsepd serve`): fetches its tokenizer, streams the "
                    "text to the terminal. With --local (or --prompt): single-process generation with the reference "
                    "model, printing the text, tokens/s and the per-request state size; weights are random from "
                    "--seed unless --checkpoint is given.")
    p.add_argument("text", nargs="?", default=None, help="the prompt; sends it to the router unless --local")
    p.add_argument("--router", default="127.0.0.1:30000", help="the router's gRPC address (default: %(default)s)")
    p.add_argument("--tls-ca", default=None, metavar="PATH",
                   help="router mode: connect with TLS, trusting this CA (PEM) for the router's certificate")
    p.add_argument("--local", action="store_true", help="run the model in this process instead of asking a router")
    p.add_argument("--stop", action="append", default=None, help="a stop string (router mode; repeat for several)")
    p.add_argument("--timeout", type=float, default=600.0, help="router mode: seconds before giving up (default: 600)")
    p.add_argument("--preset", default="tiny", help="model preset: tiny, bench, v4-flash, v4-pro (default: tiny)")
    p.add_argument("--prompt", default="The quick brown fox",
                   help="prompt text for single-process generation (implies --local; default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=-1, help="-1 = off (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1] (default: %(default)s)")
    p.add_argument("--min-p", type=float, default=0.0, help="min probability relative to the best (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed and weight seed (default: %(default)s)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.add_argument("--checkpoint", default=None, help="directory of safetensors weights (default: random init)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--prefill-chunk", type=int, default=None, help="prefill in chunks of this many tokens")
    p.add_argument("--reference", action="store_true",
                   help="run the plain reference loop (one request, no pools) instead of the paged engine")
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    if args.text is not None and not args.local:
        from sparsepd.router.client import run

        return run(args)
    if args.text is not None:
        args.prompt = args.text
    import torch

    from sparsepd.engine.generate import generate, generate_with_engine
    from sparsepd.engine.sampling import SamplingParams
    from sparsepd.model.config import get_preset
    from sparsepd.model.tokenizer import load_tokenizer
    from sparsepd.model.weights import build_model, read_config
    from sparsepd.router.model_card import card_for

    cfg = (read_config(args.checkpoint) if args.checkpoint else None) or get_preset(args.preset)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    params = SamplingParams.checked(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
        max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos)
    print(f"building {cfg.name} ({cfg.n_layers} layers, dim {cfg.dim}) on {args.device} ...", file=sys.stderr)
    model = build_model(cfg, seed=args.seed, checkpoint=args.checkpoint, device=args.device)
    tokenizer = load_tokenizer(cfg, args.checkpoint)
    encoder = card_for(args.preset, args.checkpoint).prompt_encoder()  # the router's rule for text, when it has one
    prompt_ids = encoder.encode(args.prompt) if encoder is not None else tokenizer.encode(args.prompt)
    if args.reference:
        result = generate(model, prompt_ids, params, prefill_chunk=args.prefill_chunk)
    else:
        result = generate_with_engine(model, prompt_ids, params, args.prefill_chunk)
    print(f"prompt: {args.prompt!r} ({len(prompt_ids)} tokens)")
    print(f"prompt ids: {prompt_ids}")
    print(f"output: {tokenizer.decode(result.output_ids)!r}")
    print(f"tokens: {result.output_ids}")
    print(f"finish: {result.finish_reason}; prefill {result.prefill_s * 1e3:.1f} ms "
          f"({len(prompt_ids) / max(result.prefill_s, 1e-9):.1f} tokens/s); decode "
          f"{result.decode_tokens_per_s:.1f} tokens/s; state {result.state_bytes} bytes per request "
          f"at {len(prompt_ids) + len(result.output_ids) - 1} tokens")
    return 0


def _worker_parser(name: str, module: str, help_text: str) -> Callable[[argparse._SubParsersAction], None]:
    def add(sub: argparse._SubParsersAction) -> None:
        import importlib

        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=mod.__doc__)
        mod.add_arguments(p)
        p.set_defaults(run=lambda args: __import__("asyncio").run(mod.serve(args)))

    return add


def _tool_parser(name: str, module: str, help_text: str) -> Callable[[argparse._SubParsersAction], None]:
    """A subcommand whose module has `add_arguments(p)` and a synchronous `run(args) -> int`."""
    def add(sub: argparse._SubParsersAction) -> None:
        import importlib

        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=mod.__doc__)
        mod.add_arguments(p)
        p.set_defaults(run=mod.run)

    return add


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _generate_parser,
    _worker_parser("prefill-worker", "sparsepd.prefill_worker.main", "run one prefill worker process"),
    _worker_parser("decode-worker", "sparsepd.decode_worker.main", "run one decode worker process"),
    _worker_parser("router", "sparsepd.router.main", "run the public gRPC router in front of given workers"),
    _worker_parser("serve", "sparsepd.router.serve", "start the router with prefill and decode workers"),
    _tool_parser("loadtest", "sparsepd.loadtest.main", "load-test a router: a concurrency sweep, JSONL results, plots"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsepd", description="Prefill/decode disaggregated serving for DeepSeek-V4-style models.")
    parser.add_argument("--version", action="version", version=f"sparsepd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
