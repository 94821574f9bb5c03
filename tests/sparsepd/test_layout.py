"""The repository's top-level folders install as the sparsepd.* namespace (DESIGN.md §2), and
dependencies point one way (STYLE.md): kernels ← model ← engine ← workers/router."""

import ast
import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"sparsepd": "sparsepd", "sparsepd.kernels": "kernels", "sparsepd.model": "model",
            "sparsepd.engine": "engine", "sparsepd.proto": "proto", "sparsepd.prefill_worker": "prefill_worker",
            "sparsepd.decode_worker": "decode_worker", "sparsepd.router": "router",
            "sparsepd.loadtest": "loadtest"}
# What each package may import from the project (besides itself and sparsepd's root).
WORKER = {"kernels", "model", "engine", "proto"}
ALLOWED = {"kernels": set(), "model": {"kernels"}, "engine": {"kernels", "model"}, "proto": set(),
           "prefill_worker": WORKER, "decode_worker": WORKER, "router": {"proto"},
           "loadtest": {"proto"}}


def test_every_subpackage_resolves_to_its_folder():
    for name, folder in PACKAGES.items():
        module = importlib.import_module(name)
        assert Path(module.__file__).resolve().parent == ROOT / folder, name


def test_every_top_level_package_folder_is_mapped():
    folders = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert folders == set(PACKAGES.values()), folders ^ set(PACKAGES.values())


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package):
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                parts = name.split(".")
                if parts[0] in set(PACKAGES.values()) - {"sparsepd"}:
                    pytest.fail(f"{path}: bare import {name!r}; use sparsepd.{name}")
                if parts[0] == "sparsepd" and len(parts) > 1 and parts[1] in PACKAGES.values():
                    target = parts[1]
                    assert target == package or target in ALLOWED[package], f"{path} imports {name}"


def test_wheel_contains_every_subpackage(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel = next(tmp_path.glob("sparsepd-*.whl"))
    files = zipfile.ZipFile(wheel).namelist()
    for name in PACKAGES:
        assert f"{name.replace('.', '/')}/__init__.py" in files, name
