"""Real prefill and decode worker processes on 127.0.0.1 (free ports), stopped by pid after the module."""

from __future__ import annotations

import pytest

from sparsepd.deploy.launch import start, stop

WORKER_ARGS = ["--preset", "tiny", "--num-slots", "24", "--max-batch-tokens", "256", "--num-pages", "256"]


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    ipc = tmp_path_factory.mktemp("ipc") / "decode.sock"
    decode = start("decode", ["decode-worker", *WORKER_ARGS, "--zmq-endpoint", "tcp://127.0.0.1:0",
                              "--reservation-ttl", "3"])
    decode_ipc = None
    prefill = None
    try:
        decode_ipc = start("decode-ipc", ["decode-worker", *WORKER_ARGS, "--zmq-endpoint", f"ipc://{ipc}"])
        prefill = start("prefill", ["prefill-worker", *WORKER_ARGS, "--transfer-timeout", "3"])
        yield {"decode": decode, "decode_ipc": decode_ipc, "prefill": prefill}
    finally:
        for child in (prefill, decode_ipc, decode):
            if child is not None:
                stop(child)
