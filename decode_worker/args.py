"""`sparsepd decode-worker`: one decode process (control server + state receiver + decode loop). With
--colocated it also serves the prefill control API and prefills in its own engine (no transfer): the
single-engine baseline behind the same router. With --router it registers itself there."""

from __future__ import annotations

import argparse

from sparsepd.cluster_token import add_token_args
from sparsepd.engine.args import add_engine_args, add_prefix_cache_args
from sparsepd.group_args import add_group_args
from sparsepd.registration import add_registration_args
from sparsepd.tls import add_tls_args


# The flags of `sparsepd decode-worker`, torch-free: the parser builds without loading the engine (main.py runs it).
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="control server address (default: %(default)s)")
    p.add_argument("--port", type=int, default=0, help="control server port; 0 = any free port (default: 0)")
    p.add_argument("--zmq-endpoint", default="tcp://127.0.0.1:0",
                   help="where prefill workers push states: tcp://HOST:PORT (0 = any) or ipc://PATH "
                        "(default: %(default)s)")
    p.add_argument("--zmq-advertise", default=None, metavar="ENDPOINT",
                   help="the endpoint prefill workers should push to, when it differs from the bound one (required "
                        "when --zmq-endpoint binds 0.0.0.0), e.g. tcp://dhost:5601")
    p.add_argument("--reservation-ttl", type=float, default=30.0,
                   help="seconds a reservation waits for its state before its pages are freed, at most (a router's "
                        "shorter --reserve-ttl wins) (default: 30)")
    p.add_argument("--colocated", action="store_true",
                   help="also take prefill batches and run them in this engine (prefill and decode in one process)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM: seconds the running requests may take to finish before they are aborted "
                        "(default: %(default)s)")
    p.add_argument("--max-retracted-memory", type=int, default=None, metavar="BYTES",
                   help="host memory the states of retracted requests (moved out of the pool for want of a page) may "
                        "take; past it the newest decoding request fails RESOURCE_EXHAUSTED instead of being "
                        "retracted (default: the size of the KV pool; with a prefix-cache host tier, colocated, "
                        "retracted states share --prefix-cache-host-bytes, evicting its entries first, and this "
                        "caps their part, default all of it)")
    p.add_argument("--log-level", default="INFO")
    add_engine_args(p)
    add_group_args(p)
    add_prefix_cache_args(p, "with --colocated only (a decode worker prefills nothing)")
    add_registration_args(p)
    add_token_args(p)
    add_tls_args(p, client_ca=False)
