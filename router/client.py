"""`sparsepd generate "..."`: a client of a running router. Fetches the tokenizer with GetTokenizer,
encodes the prompt (by the tokenizer's own special-token rule, sparsepd/prompt_encoding.py, as the router
encodes text), streams Generate and prints the text to stdout as it arrives (decoded
incrementally, so a character split over tokens prints whole); a summary goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import sys
import time
import zipfile

import grpc

from sparsepd.prompt_encoding import PromptEncoder
from sparsepd.proto import sglang_scheduler_pb2 as pb
from sparsepd.proto import sglang_scheduler_pb2_grpc as pb_grpc
from sparsepd.proto import smg_common_pb2
from sparsepd.router.text import IncrementalText


async def fetch_tokenizer(stub: pb_grpc.SglangSchedulerStub, timeout_s: float = 30.0) -> PromptEncoder:
    """The router's tokenizer files, checked against the archive's SHA-256, as the text-to-ids rule (its
    `tokenizer` decodes)."""
    chunks = [c async for c in stub.GetTokenizer(smg_common_pb2.GetTokenizerRequest(), timeout=timeout_s)]
    data = b"".join(c.data for c in chunks)
    if not chunks or chunks[-1].sha256 != hashlib.sha256(data).hexdigest():
        raise RuntimeError("the tokenizer archive from the router is damaged (SHA-256 mismatch)")
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        files = {name: zf.read(name) for name in zf.namelist()}
    encoder = PromptEncoder.from_files(files, "the router's ")
    if encoder is None:
        raise RuntimeError("the tokenizer archive from the router has no tokenizer.json")
    return encoder


def open_channel(address: str, tls_ca: str | None) -> grpc.aio.Channel:
    """Plaintext, or TLS trusting the CA in the file `tls_ca` (a router started with --tls-cert)."""
    if tls_ca is None:
        return grpc.aio.insecure_channel(address)
    with open(tls_ca, "rb") as f:
        return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=f.read()))


async def generate(args: argparse.Namespace) -> int:
    async with open_channel(args.router, getattr(args, "tls_ca", None)) as channel:
        stub = pb_grpc.SglangSchedulerStub(channel)
        try:
            encoder = await fetch_tokenizer(stub)
        except grpc.aio.AioRpcError as exc:
            return _rpc_error(args.router, exc)
        ids, tokenizer = encoder.encode(args.text), encoder.tokenizer
        sampling = pb.SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                     min_p=args.min_p, max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos,
                                     stop=args.stop or [])
        if args.seed is not None:
            sampling.seed = args.seed
        request = pb.GenerateRequest(tokenized=pb.TokenizedInput(original_text=args.text, input_ids=ids),
                                     sampling_params=sampling, stream=True)
        detok, started, done = IncrementalText(tokenizer), time.perf_counter(), None
        try:
            async for response in stub.Generate(request, timeout=args.timeout):
                if response.HasField("chunk"):
                    for token in response.chunk.token_ids:
                        sys.stdout.write(detok.push(token))
                    sys.stdout.flush()
                else:
                    done = response.complete
        except grpc.aio.AioRpcError as exc:
            print(file=sys.stdout)
            return _rpc_error(args.router, exc)
    sys.stdout.write(detok.flush() + "\n")
    elapsed = time.perf_counter() - started
    matched = f" (matched {done.matched_stop_str!r})" if done.HasField("matched_stop_str") else ""
    print(f"finish: {done.finish_reason}{matched}; {done.prompt_tokens} prompt + {done.completion_tokens} generated "
          f"tokens in {elapsed:.2f} s; time to first token {done.ttft_ms:.1f} ms; state transfer "
          f"{done.transfer_bytes} bytes in {done.transfer_ms:.1f} ms", file=sys.stderr)
    print(f"prompt ids: {ids}", file=sys.stderr)
    print(f"tokens: {list(done.output_ids)}", file=sys.stderr)
    return 0


def _rpc_error(address: str, exc: grpc.aio.AioRpcError) -> int:
    hint = " (is `sparsepd serve` running there?)" if exc.code() == grpc.StatusCode.UNAVAILABLE else ""
    print(f"error: the router at {address} answered {exc.code().name}: {exc.details()}{hint}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    return asyncio.run(generate(args))
