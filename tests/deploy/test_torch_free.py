"""The router and the clients start without torch (docs/DESIGN.md §2, "Layers"): a real `sparsepd router` in
front of a real colocated worker serves a real `sparsepd generate TEXT` client, both run with Python's import
trace on (PYTHONPROFILEIMPORTTIME, the `-X importtime` of a process started as a user starts it), and neither
trace holds torch; the CLI imports only the chosen subcommand's role, and every role's parser is torch-free. The
floor's model configuration (presets, a checkpoint's config.json, the fingerprint) and sampling parameters work in
a process that never imports torch, and give what the workers compute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sparsepd.deploy.launch import start, stop

ROLE_PACKAGES = ("router", "prefill_worker", "decode_worker", "loadtest", "engine", "model", "kernels")


def imported(trace: str) -> set[str]:
    """The modules an import trace (`-X importtime` lines on stderr) names."""
    return {line.rsplit("|", 1)[1].strip() for line in trace.splitlines() if line.startswith("import time:")}


def _torch_in(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m == "torch" or m.startswith("torch."))


def _traced_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}


@pytest.fixture(scope="module")
def worker():
    child = start("colocated", ["decode-worker", "--colocated", "--preset", "tiny", "--num-slots", "4",
                                "--num-pages", "64"], timeout_s=240)
    try:
        yield child.ready["grpc"]
    finally:
        stop(child)


def _start_traced_router(worker: str, trace: Path) -> tuple[subprocess.Popen, dict]:
    """`python -m sparsepd router` with the import trace to `trace`; its READY endpoints."""
    with trace.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "sparsepd", "router", "--port", "0", "--metrics-port", "-1",
                                 "--colocated", worker], stdout=subprocess.PIPE, stderr=err, text=True,
                                env=_traced_env(), start_new_session=True)
    ready: dict = {}

    def read() -> None:
        for line in proc.stdout:
            if line.startswith("READY ") and not ready:
                ready.update(json.loads(line[len("READY "):]))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    for _ in range(1200):
        if ready or proc.poll() is not None:
            break
        reader.join(0.1)
    if not ready:
        proc.kill()
        proc.wait(10)
        pytest.fail(f"the router did not start (exit code {proc.returncode}):\n{trace.read_text()[-3000:]}")
    return proc, ready


def test_router_and_generate_client_run_without_torch(worker, tmp_path):
    trace = tmp_path / "router.stderr"
    router, ready = _start_traced_router(worker, trace)
    try:
        client = subprocess.run([sys.executable, "-m", "sparsepd", "generate", "Hello", "--router", ready["grpc"],
                                 "--max-new-tokens", "5", "--ignore-eos"], capture_output=True, text=True,
                                env=_traced_env(), timeout=180)
    finally:
        router.terminate()
        code = router.wait(60)
    assert client.returncode == 0, client.stderr[-3000:]
    assert "finish: length" in client.stderr
    assert len(json.loads(client.stderr.split("tokens: ")[1].splitlines()[0])) == 5
    assert code == 0, trace.read_text()[-3000:]

    client_modules, router_modules = imported(client.stderr), imported(trace.read_text())
    # the traces are real: each names the modules its role runs on
    assert {"sparsepd.deploy.cli", "sparsepd.router.client", "grpc"} <= client_modules
    assert {"sparsepd.router.dispatch", "sparsepd.fingerprint", "sparsepd.router.service"} <= router_modules
    assert _torch_in(client_modules) == [], "the generate client imported torch"
    assert _torch_in(router_modules) == [], "the router imported torch (through the whole request)"
    assert {"sparsepd.model_config", "sparsepd.sampling_params"} <= router_modules  # the floor's, not the model's
    for name in ("engine", "model", "prefill_worker", "decode_worker", "kernels"):
        assert not any(m == f"sparsepd.{name}" or m.startswith(f"sparsepd.{name}.")
                       for m in client_modules | router_modules), name


@pytest.mark.parametrize("argv, role", [
    (["--help"], None),
    (["router", "--help"], "router"),
    (["prefill-worker", "--help"], "prefill_worker"),
    (["decode-worker", "--help"], "decode_worker"),
    (["loadtest", "--help"], "loadtest"),
    (["generate", "--help"], None),
])
def test_the_cli_imports_only_the_chosen_subcommand(argv, role):
    out = subprocess.run([sys.executable, "-m", "sparsepd", *argv], capture_output=True, text=True,
                         env=_traced_env(), timeout=120)
    assert out.returncode == 0 and "usage: sparsepd" in out.stdout, out.stderr[-3000:]
    modules = imported(out.stderr)
    assert "sparsepd.deploy.cli" in modules and _torch_in(modules) == []
    roles = {p for p in ROLE_PACKAGES for m in modules if m == f"sparsepd.{p}" or m.startswith(f"sparsepd.{p}.")}
    # a worker's flags include the engine's (engine/args.py, torch-free)
    assert roles <= ({role, "engine"} if role in ("prefill_worker", "decode_worker") else {role} - {None}), roles


def test_every_parser_builds_without_torch():
    code = ("import sys; from sparsepd.deploy.cli import build_parser; p = build_parser(); "
            "p.parse_args(['prefill-worker', '--port', '0']); p.parse_args(['serve', '--colocated']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


# A checkpoint's config.json as transformers 5 writes a DeepSeek-V4 config (the `tiny` preset's sizes).
T5_CONFIG = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 260, "hidden_size": 64,
    "num_hidden_layers": 5, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 96,
    "partial_rotary_factor": 1 / 3, "q_lora_rank": 48, "o_groups": 2, "o_lora_rank": 32, "sliding_window": 16,
    "layer_types": ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                    "compressed_sparse_attention", "sliding_attention"],
    "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
    "mlp_layer_types": ["hash_moe", "moe", "moe", "moe", "moe"],
    "rope_parameters": {"main": {"rope_type": "default", "rope_theta": 10000.0},
                        "compress": {"rope_type": "yarn", "rope_theta": 160000.0, "factor": 4.0,
                                     "original_max_position_embeddings": 256}},
    "index_n_heads": 4, "index_head_dim": 128, "index_topk": 4, "n_routed_experts": 8, "num_experts_per_tok": 2,
    "moe_intermediate_size": 48, "routed_scaling_factor": 1.5, "max_position_embeddings": 1024, "bos_token_id": 256,
    "eos_token_id": 257, "dtype": "float32", "transformers_version": "5.0.0",
}
FLOOR_SCRIPT = """
import json, sys
from sparsepd.checkpoint_config import read_checkpoint_config
from sparsepd.fingerprint import deployment_fingerprint
from sparsepd.model_config import get_preset
from sparsepd.proto.convert import sampling_from_proto, sampling_to_proto
from sparsepd.sampling_params import SamplingParams
cfg = read_checkpoint_config(sys.argv[1])
params = SamplingParams.checked(temperature=0.5, top_k=7, seed=3, max_new_tokens=9, logit_bias=((4, 1.5),))
try:
    SamplingParams.checked(top_p=1.5)
    refused = ""
except ValueError as exc:
    refused = str(exc)
print(json.dumps({"config": cfg.model_dump(mode="json"), "tiny": get_preset("tiny").model_dump(mode="json"),
                  "checkpoint_fp": deployment_fingerprint("tiny", sys.argv[1], 0),
                  "preset_fp": deployment_fingerprint("tiny", None, 0, num_layers=3),
                  "round_trip": sampling_from_proto(sampling_to_proto(params)) == params, "refused": refused}))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "triton") or m.startswith("sparsepd.model."))
assert not heavy, heavy
"""


def test_the_floor_reads_the_model_and_the_sampling_parameters_without_torch(tmp_path):
    from sparsepd.fingerprint import deployment_fingerprint
    from sparsepd.model_config import get_preset

    (tmp_path / "config.json").write_text(json.dumps(T5_CONFIG))
    out = subprocess.run([sys.executable, "-c", FLOOR_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    tiny = get_preset("tiny")
    assert got["tiny"] == tiny.model_dump(mode="json")
    want = {**tiny.model_dump(mode="json"), "name": tmp_path.name, "page_size": 128}  # the published page
    assert got["config"] == want
    assert got["checkpoint_fp"] == deployment_fingerprint("tiny", str(tmp_path), 0)
    assert got["preset_fp"] == deployment_fingerprint("tiny", None, 0, num_layers=3)
    assert got["round_trip"] is True
    assert got["refused"] == "invalid sampling parameters: top_p=1.5 is out of range: allowed in (0, 1]"
