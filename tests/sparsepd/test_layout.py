"""The repository's top-level folders install as the sparsepd.* namespace, and dependencies point one way
(docs/DESIGN.md §2, "Layers"): deploy → roles → engine → model → kernels, and under all of them the floor
(sparsepd/ and proto/), which imports nothing above it. Every package folder is checked, its imports in any
form: `import`, `from … import`, at module level or inside a function, and `importlib.import_module`,
`__import__` and `importlib.util.find_spec` with a constant name (a name the test cannot read is allowed only
where everything is: the deploy layer). The floor is torch-free: none of its modules imports torch or triton.
"""

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
            "sparsepd.loadtest": "loadtest", "sparsepd.deploy": "deploy"}
FOLDERS = set(PACKAGES.values())
FLOOR = {"sparsepd", "proto"}
WORKER = FLOOR | {"engine", "model", "kernels"}
# What a module in each folder may import from the project (its own folder included).
MAY_IMPORT = {
    "sparsepd": FLOOR,
    "proto": FLOOR,
    "kernels": FLOOR | {"kernels"},
    "model": FLOOR | {"model", "kernels"},
    "engine": FLOOR | {"engine", "model", "kernels"},
    "prefill_worker": WORKER | {"prefill_worker"},
    "decode_worker": WORKER | {"decode_worker"},
    "router": FLOOR | {"router"},
    "loadtest": FLOOR | {"loadtest"},
    "deploy": FOLDERS,
}
# `python -m sparsepd` runs sparsepd/__main__.py: the deploy layer's entry point, though Python wants it there.
LAYER_OF_FILE = {"sparsepd/__main__.py": "deploy"}
DYNAMIC = {"import_module", "__import__", "find_spec"}
TORCH = ("torch", "triton")  # what the floor never imports


def _target(name: str) -> str | None:
    """The folder a dotted module name lives in, None outside the project; a bare folder name is an error."""
    parts = name.split(".")
    if parts[0] in FOLDERS - {"sparsepd"}:
        raise AssertionError(f"bare import {name!r}; use sparsepd.{name}")
    if parts[0] != "sparsepd":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in FOLDERS else "sparsepd"


def imports_of(source: str, package: str) -> list[tuple[int, str | None]]:
    """(line, dotted name) of every import the source makes; name None for a dynamic import of a name the test
    cannot read."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package's own folder
                base = ".".join(["sparsepd", package, *([base] if base else [])]) if package != "sparsepd" else (
                    ".".join(["sparsepd", *([base] if base else [])]))
            found.append((node.lineno, base))
            if base == "sparsepd":  # `from sparsepd import engine` imports a package
                found += [(node.lineno, f"sparsepd.{a.name}") for a in node.names if a.name in FOLDERS]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            if name in DYNAMIC and node.args:
                arg = node.args[0]
                found.append((node.lineno, arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
                              else None))
    return found


def violations(source: str, package: str, layer: str, where: str) -> list[str]:
    out = []
    for line, name in imports_of(source, package):
        if name is None:
            if MAY_IMPORT[layer] != FOLDERS:
                out.append(f"{where}:{line}: a dynamic import of a name this test cannot read")
            continue
        try:
            target = _target(name)
        except AssertionError as exc:
            out.append(f"{where}:{line}: {exc}")
            continue
        if target is not None and target not in MAY_IMPORT[layer]:
            out.append(f"{where}:{line}: {layer} imports {name} ({target} is not below it)")
    return out


def test_every_subpackage_resolves_to_its_folder():
    for name, folder in PACKAGES.items():
        module = importlib.import_module(name)
        assert Path(module.__file__).resolve().parent == ROOT / folder, name


def test_every_top_level_package_folder_is_mapped_and_layered():
    folders = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert folders == FOLDERS, folders ^ FOLDERS
    assert set(MAY_IMPORT) == FOLDERS


@pytest.mark.parametrize("package", sorted(FOLDERS))
def test_imports_point_one_way(package):
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        found += violations(path.read_text(), package, LAYER_OF_FILE.get(rel, package), rel)
    assert not found, "\n".join(found)


@pytest.mark.parametrize("source, package, bad", [
    ("from sparsepd.engine.config import EngineConfig", "router", "router imports sparsepd.engine.config"),
    ("def f():\n    from sparsepd.model import tokenizer", "sparsepd", "sparsepd imports sparsepd.model"),
    ("import importlib\nimportlib.import_module('sparsepd.kernels.topk')", "proto", "proto imports sparsepd.kernels"),
    ("from importlib import import_module\nimport_module(name)", "loadtest", "a dynamic import"),
    ("__import__('sparsepd.deploy.launch')", "loadtest", "loadtest imports sparsepd.deploy"),
    ("from sparsepd import deploy", "engine", "engine imports sparsepd.deploy"),
    ("from sparsepd.engine import scheduler", "model", "model imports sparsepd.engine"),
    ("import router.flow", "router", "bare import"),
    ("from sparsepd.decode_worker.worker import DecodeWorker", "prefill_worker", "prefill_worker imports"),
])
def test_the_check_sees_every_form_of_import(source, package, bad):
    found = violations(source, package, package, "x.py")
    assert len(found) == 1 and bad in found[0], found


@pytest.mark.parametrize("source, package", [
    ("from sparsepd.proto import worker_pb2\nfrom sparsepd.grammar import Grammar", "router"),
    ("from sparsepd.fingerprint import deployment_fingerprint\nfrom sparsepd.model_config import PRESETS", "router"),
    ("from sparsepd.sampling_params import SamplingParams", "proto"),
    ("from sparsepd.engine.args import add_engine_args\nfrom sparsepd import __version__", "decode_worker"),
    ("import importlib\nimportlib.import_module(module)", "deploy"),
    ("import importlib.util\nimportlib.util.find_spec('smg')", "loadtest"),
])
def test_the_check_lets_allowed_imports_pass(source, package):
    assert violations(source, package, package, "x.py") == []


def torch_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import of torch or triton in the source, at any depth, and of xgrammar (which
    imports torch) at module level: the floor may compile a grammar with it only inside the function that
    needs it."""
    tree = ast.parse(source)
    top = _module_level(tree)
    found = []
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        for name in names:
            root = name.split(".")[0]
            if root in TORCH or (root == "xgrammar" and id(node) in top):
                found.append((node.lineno, name))
    return found



def _module_level(tree: ast.Module) -> set[int]:
    """The ids of the nodes that run when the module is imported (not inside a function's body)."""
    out, todo = set(), list(tree.body)
    while todo:
        node = todo.pop()
        out.add(id(node))
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            todo.extend(ast.iter_child_nodes(node))
    return out


@pytest.mark.parametrize("package", sorted(FLOOR))
def test_the_floor_is_torch_free(package):
    """The floor (the model's configuration, the fingerprint, the sampling parameters among it) is what the router
    and the clients share with the workers: none of it may pull in torch (tests/deploy/test_torch_free.py runs it)."""
    found = [f"{path.relative_to(ROOT)}:{line}: imports {name}" for path in sorted((ROOT / package).rglob("*.py"))
             for line, name in torch_imports(path.read_text())]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("source, bad", [
    ("import torch", "torch"), ("def f():\n    import torch.nn", "torch.nn"), ("from triton import jit", "triton"),
    ("import xgrammar", "xgrammar"), ("try:\n    import xgrammar as xgr\nexcept ImportError:\n    pass", "xgrammar"),
])
def test_the_torch_check_sees_every_form(source, bad):
    assert [name for _, name in torch_imports(source)] == [bad]


def test_the_torch_check_lets_a_lazy_grammar_compiler_pass():
    assert torch_imports("import json\ndef compile_grammar():\n    import xgrammar as xgr\n    return xgr") == []


def test_wheel_contains_every_subpackage(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel = next(tmp_path.glob("sparsepd-*.whl"))
    files = zipfile.ZipFile(wheel).namelist()
    for name in PACKAGES:
        assert f"{name.replace('.', '/')}/__init__.py" in files, name
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):  # the default model
        assert f"sparsepd/models/v4-byte-demo/{name}" in files, name
