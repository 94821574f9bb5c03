"""The deployment secret and the fingerprint: where a process finds the token, what it refuses, the keys
derived from it; the router's fingerprint is the workers' own, computed without torch."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from sparsepd.cluster_token import (
    METADATA_KEY,
    TOKEN_ENV,
    add_token_args,
    derive_key,
    generate_token,
    token_from_args,
    token_matches,
)
from sparsepd.deploy.cli import main as cli_main
from sparsepd.fingerprint import deployment_fingerprint
from sparsepd.model_config import get_preset
from sparsepd.proto.transfer import model_fingerprint


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_token_args(p)
    return p.parse_args(argv)


def test_the_token_comes_from_the_file_else_the_environment(tmp_path):
    path = tmp_path / "token"
    path.write_text("from-the-file-0123456789\nignored\n")
    os.chmod(path, 0o600)
    env = {TOKEN_ENV: "from-the-environment-0123"}
    assert token_from_args(_args("--cluster-token-file", str(path)), env) == "from-the-file-0123456789"
    assert token_from_args(_args(), env) == "from-the-environment-0123"
    assert token_from_args(_args("--no-cluster-auth"), env) is None


@pytest.mark.parametrize("token,needle", [("short", "16..1024"), ("has a space 0123456789", "without spaces"),
                                          ("", "16..1024")])
def test_a_bad_token_is_refused_by_name(tmp_path, token, needle):
    path = tmp_path / "token"
    path.write_text(token)
    with pytest.raises(ValueError, match=needle):
        token_from_args(_args("--cluster-token-file", str(path)), {})
    with pytest.raises(ValueError, match=TOKEN_ENV if token else "no deployment secret"):
        token_from_args(_args(), {TOKEN_ENV: token})


def test_no_token_at_all_is_an_error_that_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="--cluster-token-file PATH or set SPARSEPD_CLUSTER_TOKEN"):
        token_from_args(_args(), {})
    with pytest.raises(ValueError, match="No such file"):
        token_from_args(_args("--cluster-token-file", str(tmp_path / "missing")), {})


@pytest.mark.parametrize("role", ["router", "prefill-worker", "decode-worker"])
def test_a_process_without_a_token_does_not_start(role, monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV)
    assert cli_main([role, "--port", "0"]) == 2  # before it binds a port or builds a model
    assert "no deployment secret" in capsys.readouterr().err


def test_keys_and_comparison():
    token = generate_token()
    assert len(token) >= 43 and token != generate_token()
    assert derive_key(token, "transfer") != derive_key(token, "other") and len(derive_key(token, "transfer")) == 32
    assert derive_key(token, "transfer") == derive_key(token, "transfer")
    assert token_matches(((METADATA_KEY, token),), token)
    assert not token_matches(((METADATA_KEY, token[:-1]),), token) and not token_matches((), token)
    assert not token_matches(None, token) and not token_matches((("other", token),), token)


def test_the_routers_fingerprint_is_the_workers_and_needs_no_torch():
    cfg = get_preset("tiny")
    assert deployment_fingerprint("tiny", None, 0) == model_fingerprint(cfg, extra="seed=0;checkpoint=None")
    assert deployment_fingerprint("tiny", None, 7) != deployment_fingerprint("tiny", None, 0)
    code = ("import sys; import sparsepd.router.main; from sparsepd.fingerprint import deployment_fingerprint; "
            "deployment_fingerprint('tiny', None, 0); assert 'torch' not in sys.modules, 'torch imported'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_serve_hands_its_children_the_given_token_or_a_new_one(tmp_path, monkeypatch):
    from sparsepd.deploy.serve import add_arguments, children_env

    p = argparse.ArgumentParser()
    add_arguments(p)
    monkeypatch.setenv(TOKEN_ENV, "the-operators-token-0123456789")
    assert children_env(p.parse_args([])) == {TOKEN_ENV: "the-operators-token-0123456789"}
    assert children_env(p.parse_args(["--no-cluster-auth"])) == {}
    monkeypatch.delenv(TOKEN_ENV)
    first, second = children_env(p.parse_args([])), children_env(p.parse_args([]))
    assert len(first[TOKEN_ENV]) >= 43 and first != second  # a new random one per deployment
    (tmp_path / "bad").write_text("short\n")
    with pytest.raises(ValueError, match="16..1024"):  # a bad file is an error, never silently replaced
        children_env(p.parse_args(["--cluster-token-file", str(tmp_path / "bad")]))
