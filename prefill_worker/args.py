"""`sparsepd prefill-worker`: one prefill process (control server + engine + state sender). With --router
it registers itself there."""

from __future__ import annotations

import argparse

from sparsepd.cluster_token import add_token_args
from sparsepd.engine.args import add_engine_args, add_prefix_cache_args
from sparsepd.group_args import add_group_args
from sparsepd.registration import add_registration_args
from sparsepd.tls import add_tls_args


# The flags of `sparsepd prefill-worker`, torch-free: the parser builds without loading the engine (main.py runs it).
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="control server address (default: %(default)s)")
    p.add_argument("--port", type=int, default=0, help="control server port; 0 = any free port (default: 0)")
    p.add_argument("--transfer-timeout", type=float, default=10.0,
                   help="seconds to wait for a decode worker's ack before failing the request (default: 10)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM: seconds the batch in flight may take to finish (default: %(default)s)")
    p.add_argument("--log-level", default="INFO")
    add_engine_args(p)
    add_group_args(p)
    add_prefix_cache_args(p)
    add_registration_args(p)
    add_token_args(p)
    add_tls_args(p, client_ca=False)
