"""TLS for the gRPC ports: the router's public port, the workers' control ports, and the channels the processes
of a deployment open to each other (router → workers, workers → router for registration).

    --tls-cert, --tls-key   this process's gRPC server speaks TLS only, with this certificate (PEM chain) and key;
                            they are also its client certificate when it dials a peer that asks for one
    --tls-client-ca         the server asks every client for a certificate signed by this CA (mutual TLS)
    --cluster-tls-ca        dial the deployment's other processes with TLS, trusting this CA (their --tls-cert
                            must chain to it and name the host dialled, e.g. IP:10.0.0.5 in subjectAltName)

Without them every port and channel is plaintext (the cluster token still authenticates the control calls,
but anyone on the path can read it: use TLS across hosts). The P→D zmq transfer is not TLS; its frames are
authenticated by an HMAC (proto/transfer.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc
from pydantic import BaseModel, ConfigDict


class TlsConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    client_ca_pem: bytes | None = None
    cluster_ca_pem: bytes | None = None

    @property
    def serves_tls(self) -> bool:
        return self.cert_pem is not None

    @property
    def dials_tls(self) -> bool:
        return self.cluster_ca_pem is not None


def add_tls_args(p: argparse.ArgumentParser, *, client_ca: bool = True) -> None:
    g = p.add_argument_group("TLS (PEM files)")
    g.add_argument("--tls-cert", default=None, metavar="PATH",
                   help="certificate chain of this process's gRPC server (with --tls-key): the port speaks TLS only")
    g.add_argument("--tls-key", default=None, metavar="PATH", help="private key of --tls-cert")
    if client_ca:
        g.add_argument("--tls-client-ca", default=None, metavar="PATH",
                       help="require clients to present a certificate signed by this CA (mutual TLS)")
    g.add_argument("--cluster-tls-ca", default=None, metavar="PATH",
                   help="dial the deployment's other processes over TLS, trusting this CA")


def tls_from_args(args: argparse.Namespace) -> TlsConfig:
    cert, key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    client_ca = getattr(args, "tls_client_ca", None)
    if (cert is None) != (key is None):
        raise ValueError("--tls-cert and --tls-key go together: give both or neither")
    if client_ca is not None and cert is None:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
    return TlsConfig(cert_pem=_read("--tls-cert", cert, b"CERTIFICATE"), key_pem=_read("--tls-key", key, b"KEY"),
                     client_ca_pem=_read("--tls-client-ca", client_ca, b"CERTIFICATE"),
                     cluster_ca_pem=_read("--cluster-tls-ca", getattr(args, "cluster_tls_ca", None), b"CERTIFICATE"))


def _read(flag: str, path: str | None, kind: bytes) -> bytes | None:
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag} {path!r}: {exc.strerror}") from None
    if b"-----BEGIN " not in data or kind not in data:
        raise ValueError(f"{flag} {path!r}: not a PEM file holding a {kind.decode().lower()}")
    return data


def add_port(server: grpc.aio.Server, address: str, tls: TlsConfig) -> int:
    """Bind `address` on `server`, with TLS when the config has a certificate; the bound port."""
    if not tls.serves_tls:
        return server.add_insecure_port(address)
    credentials = grpc.ssl_server_credentials([(tls.key_pem, tls.cert_pem)], root_certificates=tls.client_ca_pem,
                                              require_client_auth=tls.client_ca_pem is not None)
    return server.add_secure_port(address, credentials)


def cluster_channel(address: str, tls: TlsConfig, options: list | None = None) -> grpc.aio.Channel:
    """A channel to another process of the deployment: TLS trusting --cluster-tls-ca (presenting this process's
    certificate) when given, plaintext otherwise."""
    if not tls.dials_tls:
        return grpc.aio.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(root_certificates=tls.cluster_ca_pem, private_key=tls.key_pem,
                                               certificate_chain=tls.cert_pem)
    return grpc.aio.secure_channel(address, credentials, options=options)
