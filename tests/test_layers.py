"""The layering contracts in pyproject.toml ([tool.importlinter]) hold on the tree, and they
catch what they are for: each mutation below adds one forbidden import to a copy of the
packages, and `lint-imports` must then fail naming it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["pagedserve", "gateway", "tokenizer_svc", "engine_svc", "kernels", "protos"]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT), "--no-logo", "--no-cache"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layers")
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root)
    return root


def test_the_tree_keeps_every_contract():
    res = _lint(REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Contracts: 2 kept, 0 broken." in res.stdout


def test_every_module_is_in_a_layer():
    """A module outside every layer would not be checked at all: each one must fall in a
    layer of the contract, except ``engine_svc`` itself (the offline API's re-exports)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in cfg["contracts"] if c["type"] == "layers"]
    names = [n.strip() for layer in layers for n in layer.replace(":", "|").split("|")]
    outside = []
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            if module != "engine_svc" and not any(
                module == n or module.startswith(n + ".") for n in names
            ):
                outside.append(module)
    assert outside == []


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # the wire layer reaching up to the engine (what pagedserve/ipc.py used to do)
        ("protos/transport.py", "import engine_svc.core.scheduler", "protos is not allowed"),
        # a service importing the CLI package
        ("gateway/service.py", "import pagedserve.serve", "gateway is not allowed"),
        # engine core reaching up to a runner
        ("engine_svc/core/scheduler.py", "import engine_svc.runner.cpu", "engine_svc.core is not"),
        # the model layer reaching up to a runner (how the two forwards were tied together)
        ("engine_svc/models/llama.py", "import engine_svc.runner.cpu_ops", "engine_svc.models is"),
        # two services importing each other
        ("tokenizer_svc/worker.py", "import gateway.workers", "tokenizer_svc is not allowed"),
        # engine internals building messages themselves
        (
            "engine_svc/core/scheduler.py",
            "from protos.pagedserve.internal.v1 import ipc_pb2",
            "engine_svc.core is not allowed to import protos.pagedserve",
        ),
        # ... or loading the generated code through a wire module that builds messages
        (
            "engine_svc/sampler.py",
            "import protos.convert",
            "engine_svc.sampler is not allowed to import protos.pagedserve",
        ),
    ],
)
def test_an_upward_import_breaks_a_contract(tree, module, line, broken):
    path = tree / module
    original = path.read_text()
    try:
        path.write_text(original + f"\n{line}  # noqa\n")
        res = _lint(tree)
    finally:
        path.write_text(original)
    assert res.returncode != 0, res.stdout
    assert broken in res.stdout, res.stdout
    importer = module.removesuffix(".py").replace("/", ".")
    assert f"{importer} -> {line.split()[1]}" in res.stdout, res.stdout
