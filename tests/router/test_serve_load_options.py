"""`sparsepd serve --load-format dummy --num-layers N`: the router and every worker get the same weight options
(so their fingerprints agree and the workers register), the workers print the memory plan, and a client's greedy
text equals the single-process engine's on the same dummy weights."""

from __future__ import annotations

import subprocess
import sys

from sparsepd.deploy.launch import start, stop
from sparsepd.engine.generate import generate_with_engine
from sparsepd.engine.sampling import SamplingParams
from sparsepd.load_options import LoadOptions, resolve_model_config
from sparsepd.model.tokenizer import ByteTokenizer
from sparsepd.model.weights import build_model

OPTIONS = LoadOptions(load_format="dummy", num_layers=3)


def test_serve_with_dummy_weights_and_fewer_layers():
    child = start("serve", ["serve", "--preset", "tiny",
                            "--port", "0", "--metrics-port", "-1", "--num-slots", "4", "--num-pages", "64",
                            "--load-format", "dummy", "--num-layers", "3", "--child-logs"], timeout_s=240)
    try:
        out = subprocess.run([sys.executable, "-m", "sparsepd", "generate", "Hello", "--router", child.ready["grpc"],
                              "--max-new-tokens", "6", "--ignore-eos"], capture_output=True, text=True, timeout=120)
    finally:
        code = stop(child, timeout_s=30)
    logs = "\n".join(child.log_tail)
    assert code == 0, logs
    assert out.returncode == 0, out.stderr
    cfg = resolve_model_config("tiny", None, OPTIONS)
    assert (cfg.n_layers, cfg.weight_format) == (3, "fp8")
    assert logs.count("model tiny: 3 layers, weight_format fp8") == 2, logs  # the prefill and the decode worker
    assert "KV pools" in logs and "weights " in logs
    model = build_model(cfg, seed=0, load_format="dummy")
    ids = generate_with_engine(model, [256, *b"Hello"], SamplingParams(max_new_tokens=6, ignore_eos=True)).output_ids
    assert f"tokens: {ids}" in out.stderr, (ids, out.stderr)
    assert out.stdout == ByteTokenizer(260, 256, 257).decode(ids) + "\n"
