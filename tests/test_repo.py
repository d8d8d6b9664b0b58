"""Repository-level checks: lint, and the promise that each example folder stands alone."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from harness import EXAMPLES, REPO

ALLOWED_IMPORTS = {"torch", "torchvision", "deepspeed", "wandb", "matplotlib", "PIL", "numpy"}


def test_ruff_clean():
    ruff = Path(sys.executable).parent / "ruff"
    p = subprocess.run([str(ruff), "check", str(REPO)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("example", [e for e in EXAMPLES if (REPO / e / "train_ds.py").exists()])
def test_example_imports_only_stdlib_and_its_dependencies(example):
    """Each folder is copied alone to a GPU box: train_ds.py may not import anything from this repo."""
    tree = ast.parse((REPO / example / "train_ds.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    foreign = {n for n in names - ALLOWED_IMPORTS if n not in sys.stdlib_module_names}
    assert not foreign, foreign
