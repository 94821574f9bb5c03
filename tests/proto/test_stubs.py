"""The committed gRPC stubs are what the .proto files generate (skipped without grpcio-tools)."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_match_the_protos(tmp_path):
    pytest.importorskip("grpc_tools")
    run = subprocess.run(["bash", str(ROOT / "scripts/gen-protos"), str(tmp_path)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated, "no stubs generated"
    for name in generated:
        assert (tmp_path / name).read_bytes() == (ROOT / "proto" / name).read_bytes(), f"{name} is stale"


def test_stubs_import_through_the_namespace():
    from sparsepd.proto import worker_pb2, worker_pb2_grpc

    assert worker_pb2.Ticket(transfer_id="t", page_ids=[1, 2]).page_ids == [1, 2]
    assert hasattr(worker_pb2_grpc, "DecodeWorkerStub") and hasattr(worker_pb2_grpc, "PrefillWorkerServicer")
