"""The deployment secret: one token that the router and every worker of a deployment share, so that only
the deployment's own processes can register with the router, drive a worker or push a state to one.

    source      --cluster-token-file PATH (the file's first line), else the SPARSEPD_CLUSTER_TOKEN variable;
                never a command-line value (other users can read a process's arguments, not its environment).
                `sparsepd serve` generates one for its children when neither is given.
    gRPC        every worker-control call and every registration carries it as the metadata entry
                `sparsepd-cluster-token`; `RequireClusterToken` (a server interceptor) answers UNAUTHENTICATED
                when it is missing or wrong, before the request is even parsed, and logs the peer's address.
                Comparisons are constant-time (hmac.compare_digest). The public SGLang API stays open.
    zmq         the P→D transfer signs each frame header with `derive_key(token, "transfer")` (proto/transfer.py).

`--no-cluster-auth` runs a process without one (a single trusted host only): its servers take any caller
and its calls carry nothing.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import hmac
import logging
import os
import secrets
import stat
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import grpc

TOKEN_ENV = "SPARSEPD_CLUSTER_TOKEN"
METADATA_KEY = "sparsepd-cluster-token"
MIN_TOKEN_CHARS = 16
MAX_TOKEN_CHARS = 1024
WORKER_CONTROL = "/sparsepd.worker."  # every worker-control and registration method starts so

log = logging.getLogger("sparsepd.auth")


def add_token_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("deployment secret")
    g.add_argument("--cluster-token-file", default=None, metavar="PATH",
                   help=f"file holding the token every process of the deployment shares (else ${TOKEN_ENV})")
    g.add_argument("--no-cluster-auth", action="store_true",
                   help="run without the token: anyone who reaches this process's ports can drive it (one trusted "
                        "host only)")


def token_from_args(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> str | None:
    """The token from --cluster-token-file or the environment; None with --no-cluster-auth; else ValueError."""
    if args.no_cluster_auth:
        log.warning("--no-cluster-auth: this process takes worker-control calls from anyone who reaches it")
        return None
    if args.cluster_token_file:
        return read_token_file(args.cluster_token_file)
    if env.get(TOKEN_ENV):
        return check_token(env[TOKEN_ENV], f"${TOKEN_ENV}")
    raise ValueError(f"no deployment secret: give --cluster-token-file PATH or set {TOKEN_ENV} (the same token on "
                     "the router and every worker), or --no-cluster-auth to run without one")


def token_from_env(env: Mapping[str, str] = os.environ) -> str | None:
    """$SPARSEPD_CLUSTER_TOKEN, or None when it is unset (a client's view: call without one)."""
    return env.get(TOKEN_ENV) or None


def read_token_file(path: str | Path) -> str:
    path = Path(path)
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except OSError as exc:
        raise ValueError(f"--cluster-token-file {str(path)!r}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by other users (mode %o): chmod 600 it", path, stat.S_IMODE(mode))
    lines = text.splitlines()
    return check_token(lines[0].strip() if lines else "", f"--cluster-token-file {str(path)!r}")


def check_token(token: str, where: str) -> str:
    if not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS or not all(33 <= ord(c) < 127 for c in token):
        raise ValueError(f"{where}: the cluster token must be {MIN_TOKEN_CHARS}..{MAX_TOKEN_CHARS} printable ASCII "
                         f"characters without spaces, got {len(token)} characters")
    return token


def generate_token() -> str:
    return secrets.token_urlsafe(32)  # 256 random bits


def derive_key(token: str, purpose: str) -> bytes:
    """A 32-byte key for one use of the token (HMAC-SHA256 of the purpose under the token): a key leaked from
    one use does not give the token or another use's key."""
    return hmac.new(token.encode(), f"sparsepd {purpose} key v1".encode(), hashlib.sha256).digest()


def token_matches(metadata, token: str) -> bool:
    """Whether gRPC invocation metadata carries `token` (constant-time comparison)."""
    got = next((v for k, v in (metadata or ()) if k == METADATA_KEY), None)
    if isinstance(got, str):
        got = got.encode()
    return got is not None and hmac.compare_digest(got, token.encode())


# --- gRPC ----------------------------------------------------------------------------------------------------
class RequireClusterToken(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED to calls of methods under `prefix` that do not carry the token; the request bytes
    of such a call are never parsed and no servicer code runs. `refused` counts them by method."""

    def __init__(self, token: str, prefix: str = WORKER_CONTROL):
        self.token, self.prefix = token, prefix
        self.refused: Counter[str] = Counter()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self.prefix):
            return handler
        metadata = handler_call_details.invocation_metadata
        if token_matches(metadata, self.token):
            return handler
        why = "no cluster token" if all(k != METADATA_KEY for k, _ in (metadata or ())) else "a wrong cluster token"
        return self._refusal(handler, method, why)

    def _refusal(self, handler, method: str, why: str):
        async def refuse(request, context):
            self.refused[method] += 1
            log.warning("refused %s from %s: %s", method, context.peer(), why)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"{method}: {why}; this deployment's workers take calls from its own processes only")

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse, response_serializer=handler.response_serializer)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(refuse, response_serializer=handler.response_serializer)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(refuse, response_serializer=handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(refuse, response_serializer=handler.response_serializer)


def server_interceptors(token: str | None, prefix: str = WORKER_CONTROL) -> list[grpc.aio.ServerInterceptor]:
    return [] if token is None else [RequireClusterToken(token, prefix)]


class AuthorizedStub:
    """A gRPC stub whose every call carries the token (`metadata=`); attribute access is the stub's."""

    def __init__(self, stub, token: str | None):
        self._stub, self._metadata = stub, ((METADATA_KEY, token),) if token else None

    def __getattr__(self, name: str):
        method = getattr(self._stub, name)
        return functools.partial(method, metadata=self._metadata) if self._metadata else method
