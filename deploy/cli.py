"""The `sparsepd` command: one console script, one subcommand per role (docs/DESIGN.md §2).

The subcommand table names each role's modules by string: `sparsepd ROLE ...` imports ROLE's argument parser
(torch-free for every role) and, once its arguments parse, the module that runs it; no other role is
imported. So `sparsepd router` and `sparsepd generate TEXT` (a client of a router) start without torch, and
`sparsepd --help` imports no role at all (tests/deploy/test_torch_free.py).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

from sparsepd import __version__
from sparsepd.default_model import PRESET_HELP, choose_model

GENERATE_HELP = "generate text: a client of a running router, or in one process with --local"


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help=GENERATE_HELP,
        description="With TEXT: a client of a running router (`sparsepd serve`): fetches its tokenizer, streams the "
                    "text to the terminal. With --local (or --prompt): single-process generation with the reference "
                    "model, printing the text, tokens/s and the per-request state size: the shipped trained model, "
                    "a --checkpoint, or a --preset with random weights from --seed.")
    p.add_argument("text", nargs="?", default=None, help="the prompt; sends it to the router unless --local")
    p.add_argument("--router", default="127.0.0.1:30000", help="the router's gRPC address (default: %(default)s)")
    p.add_argument("--tls-ca", default=None, metavar="PATH",
                   help="router mode: connect with TLS, trusting this CA (PEM) for the router's certificate")
    p.add_argument("--local", action="store_true", help="run the model in this process instead of asking a router")
    p.add_argument("--stop", action="append", default=None, help="a stop string (router mode; repeat for several)")
    p.add_argument("--timeout", type=float, default=600.0, help="router mode: seconds before giving up (default: 600)")
    p.add_argument("--preset", default=None, help=PRESET_HELP)
    p.add_argument("--prompt", default="The quick brown fox",
                   help="prompt text for single-process generation (implies --local; default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=-1, help="-1 = off (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1] (default: %(default)s)")
    p.add_argument("--min-p", type=float, default=0.0, help="min probability relative to the best (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed and weight seed (default: %(default)s)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint directory (default: the shipped v4-byte-demo unless --preset is given)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--prefill-chunk", type=int, default=None, help="prefill in chunks of this many tokens")
    p.add_argument("--reference", action="store_true",
                   help="run the plain reference loop (one request, no pools) instead of the paged engine")
    from sparsepd.gpu_wait import GPU_WAIT_HELP, GPU_WAITS
    from sparsepd.load_flags import add_load_args

    p.add_argument("--gpu-wait", choices=GPU_WAITS, default="spin",
                   help=f"--local through the engine (not --reference): {GPU_WAIT_HELP} (default: %(default)s)")
    add_load_args(p)
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    if args.text is not None and not args.local:
        from sparsepd.router.client import run

        return run(args)
    if args.text is not None:
        args.prompt = args.text
    args.preset, args.checkpoint = choose_model(args.preset, args.checkpoint)
    import torch

    from sparsepd.engine.generate import generate, generate_with_engine
    from sparsepd.load_options import load_options_from_args, resolve_model_config
    from sparsepd.model.tokenizer import load_tokenizer
    from sparsepd.model.weight_memory import describe, weight_bytes
    from sparsepd.model.weights import build_model
    from sparsepd.router.model_card import card_for
    from sparsepd.sampling_params import SamplingParams

    options = load_options_from_args(args)
    cfg = resolve_model_config(args.preset, args.checkpoint, options)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    params = SamplingParams.checked(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
        max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos)
    print(f"building {cfg.name} ({cfg.n_layers} layers, dim {cfg.dim}, weight_format {cfg.weight_format}) on "
          f"{args.device} ...", file=sys.stderr)
    model = build_model(cfg, seed=args.seed, checkpoint=args.checkpoint, device=args.device,
                        load_format=options.load_format)
    print(f"weights {describe(weight_bytes(model))}", file=sys.stderr)
    tokenizer = load_tokenizer(cfg, args.checkpoint)
    encoder = card_for(args.preset, args.checkpoint).prompt_encoder()  # the router's rule for text, when it has one
    prompt_ids = encoder.encode(args.prompt) if encoder is not None else tokenizer.encode(args.prompt)
    if args.reference:
        result = generate(model, prompt_ids, params, prefill_chunk=args.prefill_chunk)
    else:
        result = generate_with_engine(model, prompt_ids, params, args.prefill_chunk, gpu_wait=args.gpu_wait)
    print(f"prompt: {args.prompt!r} ({len(prompt_ids)} tokens)")
    print(f"prompt ids: {prompt_ids}")
    print(f"output: {tokenizer.decode(result.output_ids)!r}")
    print(f"tokens: {result.output_ids}")
    print(f"finish: {result.finish_reason}; prefill {result.prefill_s * 1e3:.1f} ms "
          f"({len(prompt_ids) / max(result.prefill_s, 1e-9):.1f} tokens/s); decode "
          f"{result.decode_tokens_per_s:.1f} tokens/s; state {result.state_bytes} bytes per request "
          f"at {len(prompt_ids) + len(result.output_ids) - 1} tokens")
    return 0


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add: Callable[[argparse._SubParsersAction], None]  # adds its full parser (importing what builds it)


def _role(name: str, arguments: str, help_text: str, run: Callable[[argparse.Namespace], int],
          more: Callable[[argparse.ArgumentParser], None] | None = None) -> Subcommand:
    """A subcommand whose flags are `add_arguments(p)` of the module `arguments` (its docstring is the
    description), plus `more(p)`, and which `run` runs."""
    def add(sub: argparse._SubParsersAction) -> None:
        mod = importlib.import_module(arguments)
        p = sub.add_parser(name, help=help_text, description=mod.__doc__)
        mod.add_arguments(p)
        if more is not None:
            more(p)
        p.set_defaults(run=run)

    return Subcommand(name, help_text, add)


def _serve(module: str) -> Callable[[argparse.Namespace], int]:
    """Run the coroutine `serve(args)` of `module`, imported only now; a worker command with --devices starts its
    group's ranks instead, each the same command for one device (deploy/group.py)."""
    def run(args: argparse.Namespace) -> int:
        from sparsepd.deploy.group import launch_group, wants_launcher

        if wants_launcher(args):
            return launch_group(args, args.command_line)
        return asyncio.run(importlib.import_module(module).serve(args))
    return run


def _run_loadtest(args: argparse.Namespace) -> int:
    """The load test, handed this layer's launcher for --launch (it starts `sparsepd serve`)."""
    from sparsepd.deploy import launch
    from sparsepd.loadtest.main import run

    return run(args, launcher=launch)


SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand("generate", GENERATE_HELP, _generate_parser),
    _role("prefill-worker", "sparsepd.prefill_worker.args", "run one prefill worker process",
          _serve("sparsepd.prefill_worker.main")),
    _role("decode-worker", "sparsepd.decode_worker.args", "run one decode worker process",
          _serve("sparsepd.decode_worker.main")),
    _role("router", "sparsepd.router.main", "run the public gRPC router in front of given workers",
          _serve("sparsepd.router.main")),
    _role("serve", "sparsepd.deploy.serve", "start the router with prefill and decode workers",
          _serve("sparsepd.deploy.serve")),
    _role("loadtest", "sparsepd.loadtest.main", "load-test a router: a concurrency sweep, JSONL results, plots",
          _run_loadtest),
)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`: the subcommand it names is built in full, the others only listed (name and help),
    so that no other role is imported. Without argv, every subcommand in full."""
    chosen = _chosen(argv) if argv is not None else None
    parser = argparse.ArgumentParser(
        prog="sparsepd", description="Prefill/decode disaggregated serving for DeepSeek-V4-style models.")
    parser.add_argument("--version", action="version", version=f"sparsepd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in SUBCOMMANDS:
        if argv is None or command.name == chosen:
            command.add(sub)
        else:
            sub.add_parser(command.name, help=command.help)
    return parser


def _chosen(argv: list[str]) -> str | None:
    """The subcommand argv names: its first argument that is not an option (the top level has only options)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    if hasattr(args, "local_rank"):  # a worker group's launcher starts its ranks with this command (deploy/group.py)
        args.command_line = argv
    try:
        return args.run(args)
    except ValueError as exc:
        print(f"error: {error_message(exc)}", file=sys.stderr)
        return 2


def error_message(exc: ValueError) -> str:
    """A refusal as one line: a pydantic ValidationError (a ValueError) by its messages alone, without the
    input it echoes or its documentation link."""
    errors = getattr(exc, "errors", None)
    if type(exc).__name__ != "ValidationError" or not callable(errors):
        return str(exc)
    parts = []
    for e in errors():
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        loc = ".".join(str(x) for x in e.get("loc", ()))
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
