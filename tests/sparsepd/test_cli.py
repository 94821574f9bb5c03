"""The console script runs as a real process: `generate` prints text, `--help` explains every subcommand."""

import subprocess
import sys


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparsepd", *args], capture_output=True, text=True, timeout=timeout)


def test_generate_tiny_prints_text_speed_and_state_size():
    out = _run("generate", "--preset", "tiny", "--prompt", "Hello", "--max-new-tokens", "6", "--ignore-eos")
    assert out.returncode == 0, out.stderr
    assert "output:" in out.stdout and "tokens/s" in out.stdout and "bytes per request" in out.stdout
    tokens = out.stdout.split("tokens: ")[1].splitlines()[0]
    assert len(eval(tokens)) == 6  # noqa: S307 - our own printed list


def test_generate_is_deterministic_and_matches_the_library():
    from sparsepd.engine.generate import generate
    from sparsepd.engine.sampling import SamplingParams
    from sparsepd.model.tokenizer import load_tokenizer
    from sparsepd.model.weights import build_model
    from sparsepd.model_config import get_preset

    cfg = get_preset("tiny")
    ids = load_tokenizer(cfg).encode("abc")
    want = generate(build_model(cfg, seed=0), ids, SamplingParams(max_new_tokens=5, ignore_eos=True)).output_ids
    out = _run("generate", "--preset", "tiny", "--prompt", "abc", "--max-new-tokens", "5", "--ignore-eos",
               "--prefill-chunk", "2")
    assert out.returncode == 0, out.stderr
    assert f"tokens: {want}" in out.stdout


def test_bad_arguments_exit_2_with_a_message():
    out = _run("generate", "--temperature", "-1")
    assert out.returncode == 2 and "temperature" in out.stderr
    out = _run("generate", "--preset", "nope")
    assert out.returncode == 2 and "valid presets" in out.stderr


def test_help_on_everything():
    top = _run("--help")
    assert top.returncode == 0 and "generate" in top.stdout
    sub = _run("generate", "--help")
    assert sub.returncode == 0 and "--max-new-tokens" in sub.stdout


def test_log_lines_about_a_request_end_with_its_id(capsys):
    import logging

    from sparsepd.process import request_logger, setup_logging

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    try:
        setup_logging("router", "INFO")
        log = logging.getLogger("sparsepd.test")
        log.warning("first: %s", "plain")
        log.warning("second", extra={"request_id": "req-7"})
        request_logger(log, "req-8").info("third")
    finally:
        root.handlers[:] = saved
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].endswith("router WARNING sparsepd.test: first: plain")
    assert lines[1].endswith("second request_id=req-7") and lines[2].endswith("third request_id=req-8")
