"""`sparsepd serve` and `sparsepd generate` with no model flags run the shipped trained model
(`sparsepd/models/v4-byte-demo`): the text a client of the served router prints for "def fibonacci(" equals,
token for token, the single-process reference loop's greedy text on the same checkpoint, and so does
`generate --local`; the router names the model after the checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sparsepd.checkpoint_config import read_checkpoint_config
from sparsepd.default_model import DEFAULT_CHECKPOINT
from sparsepd.deploy.launch import start, stop
from sparsepd.engine.generate import generate
from sparsepd.engine.sampling import SamplingParams
from sparsepd.model.tokenizer import load_tokenizer
from sparsepd.model.weights import build_model

PROMPT = "def fibonacci("
NEW = 40


@pytest.fixture(scope="module")
def served():
    child = start("serve", ["serve", "--port", "0", "--metrics-port", "-1", "--num-slots", "4", "--num-pages", "32"],
                  timeout_s=240)
    try:
        yield child
    finally:
        code = stop(child, timeout_s=30)
        assert code == 0, "\n".join(child.log_tail)


@pytest.fixture(scope="module")
def reference() -> tuple[list[int], str]:
    cfg = read_checkpoint_config(DEFAULT_CHECKPOINT)
    model = build_model(cfg, checkpoint=DEFAULT_CHECKPOINT)
    tok = load_tokenizer(cfg, DEFAULT_CHECKPOINT)
    out = generate(model, tok.encode(PROMPT), SamplingParams(max_new_tokens=NEW, ignore_eos=True)).output_ids
    return out, tok.decode(out)


def _tokens(printed: str) -> list[int]:
    lines = [line for line in printed.splitlines() if line.startswith("tokens: ")]
    return json.loads(lines[0].removeprefix("tokens: "))


def test_the_service_prints_the_reference_greedy_text(served, reference):
    ids, text = reference
    assert served.ready["model"] == "v4-byte-demo"
    out = subprocess.run([sys.executable, "-m", "sparsepd", "generate", PROMPT, "--router", served.ready["grpc"],
                          "--max-new-tokens", str(NEW), "--ignore-eos"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == text + "\n"
    assert _tokens(out.stderr) == ids
    assert text.strip(), "the trained model printed only whitespace"


def test_generate_local_runs_it_too(reference):
    ids, text = reference
    out = subprocess.run([sys.executable, "-m", "sparsepd", "generate", PROMPT, "--local", "--max-new-tokens",
                          str(NEW), "--ignore-eos"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "building v4-byte-demo" in out.stderr
    assert _tokens(out.stdout) == ids and f"output: {text!r}" in out.stdout
