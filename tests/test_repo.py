"""Repository-level checks: lint, and the promise that each example folder stands alone."""

import ast
import re
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


SCRIPTS = {e: (REPO / e / "train_ds.py") for e in EXAMPLES}
# The contract: where two scripts do the same job they use the same code, so a diff between two examples
# shows only what differs. These definitions must stay identical (source text) across the scripts named.
SHARED = {
    ("01_basic_convnet", "02_cifar10", "03_cifar10_basic"): [
        "UsageError", "Parser", "master_weights", "read_config", "setup_distributed", "all_agree", "reduce_sum",
        "release_shm_buffer", "atomic_write", "save_checkpoint", "resume_dir", "plot_curves", "init_wandb", "write_metrics", "_writable"],
    ("01_basic_convnet", "02_cifar10"): ["DeviceBatches"],
}


def top_level_defs(path):
    src = path.read_text()
    return {n.name: ast.get_source_segment(src, n) for n in ast.parse(src).body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("examples,name", [(ex, name) for ex, names in SHARED.items() for name in names])
def test_shared_code_is_identical(examples, name):
    versions = {e: top_level_defs(SCRIPTS[e]).get(name) for e in examples}
    assert all(versions.values()), f"{name} missing in {[e for e, v in versions.items() if not v]}"
    first = versions[examples[0]]
    drifted = [e for e in examples[1:] if versions[e] != first]
    assert not drifted, f"{name} differs between {examples[0]} and {drifted}: keep the scripts parallel"


def test_scripts_have_the_same_sections_in_order():
    sections = {e: re.findall(r"^# =+ (.+)$", p.read_text(), re.M) for e, p in SCRIPTS.items()}
    assert len(set(map(tuple, sections.values()))) == 1, sections
    assert sections["01_basic_convnet"][0] == "settings" and sections["01_basic_convnet"][-1] == "training loop"
