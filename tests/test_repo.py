"""Repository-level checks: lint; each example folder stands alone; the three scripts stay parallel,
small enough to read in one sitting, on DeepSpeed's public API, and free of test hooks."""

import ast
import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest
from harness import EXAMPLES, REPO

RUFF = Path(sys.executable).parent / "ruff"
ALLOWED_IMPORTS = {"torch", "torchvision", "deepspeed", "wandb", "matplotlib", "PIL", "numpy", "train_ds"}
FOLDER_FILES = {"train_ds.py", "predict.py", "README.md", "main.py"}  # and ds_config*.json
SCRIPTS = {e: REPO / e / "train_ds.py" for e in EXAMPLES}
# Caps that later work must keep too (lines include the docstring and comments).
# Budgets a script may not outgrow. The lines cap holds what the scripts are now (contract, resume
# across GPU counts, ZeRO-3, monitors and the workarounds included): new features must fit or
# make room.
CAPS = {"lines": {"01_basic_convnet": 1163, "02_cifar10": 1284, "03_cifar10_basic": 1259},
        "main": 80, "other_function": 50, "line": 100}
WORKAROUNDS = "DeepSpeed 0.19.8 workarounds"
# Environment variables an example may read: the launcher's and Weights & Biases' own.
ENV_ALLOWED = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "WANDB_API_KEY", "WANDB_INIT_TIMEOUT"}


def test_ruff_clean():
    p = subprocess.run([str(RUFF), "check", str(REPO)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    folders = [str(REPO / e) for e in EXAMPLES]  # 100 characters a line where users read code
    p = subprocess.run([str(RUFF), "check", "--select", "E501", "--line-length", "100", *folders],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("example", EXAMPLES)
def test_folder_holds_only_what_a_user_copies(example):
    files = {p.name for p in (REPO / example).iterdir() if not p.name.startswith(".") and p.name != "__pycache__"}
    extra = {f for f in files - FOLDER_FILES if not re.fullmatch(r"ds_config\w*\.json", f)}
    assert not extra, extra
    for py in (REPO / example).glob("*.py"):
        tree = ast.parse(py.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        foreign = {n for n in names - ALLOWED_IMPORTS if n not in sys.stdlib_module_names}
        assert not foreign, (py.name, foreign)


@pytest.mark.parametrize("example", EXAMPLES)
def test_nothing_in_a_folder_speaks_of_history_or_tests(example):
    """Comments explain the code as it is: no seeds, result folders, sessions or test hooks."""
    for f in (REPO / example).iterdir():
        if f.suffix in (".py", ".md", ".json"):
            hits = re.findall(r"(?i)\bseed 00\d|results/|session \d|DS_EXAMPLES_|h100_s4|cmd\d\.sh", f.read_text())
            assert not hits, (f.name, hits)


def functions(path):
    src = path.read_text()
    return src, [n for n in ast.walk(ast.parse(src)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_scripts_read_in_one_sitting(capsys):
    """Prints each script's size, then holds it to the caps."""
    rows, problems = [], []
    for ex, path in SCRIPTS.items():
        src, fns = functions(path)
        lines = src.splitlines()
        main = max(n.end_lineno - n.lineno + 1 for n in fns if n.name == "main")
        other = max((n.end_lineno - n.lineno + 1, n.name) for n in fns if n.name != "main")
        widest = max(len(line) for line in lines)
        rows.append(f"{ex}: {len(lines)} lines (cap {CAPS['lines'][ex]}), main() {main} (cap "
                    f"{CAPS['main']}), longest other function {other[1]} {other[0]} (cap "
                    f"{CAPS['other_function']}), longest line {widest} (cap {CAPS['line']})")
        problems += [ex for ok in (len(lines) <= CAPS["lines"][ex], main <= CAPS["main"],
                                   other[0] <= CAPS["other_function"], widest <= CAPS["line"]) if not ok]
    with capsys.disabled():
        print("\n" + "\n".join(rows))
    assert not problems, rows


def private_deepspeed_access(path):
    """`x._name` outside the workarounds section, where x is not torch, sys or os."""
    src = path.read_text()
    fence = src.find(WORKAROUNDS) % (len(src) + 1)  # everything, where there is no such section
    bad = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node
            while isinstance(root, ast.Attribute):
                root = root.value
            offset = sum(len(line) + 1 for line in src.splitlines()[: node.lineno - 1])
            if not (isinstance(root, ast.Name) and root.id in ("torch", "sys", "os")) and offset < fence:
                bad.append(f"line {node.lineno}: .{node.attr}")
    return bad


def environment_names(path):
    """Every environment variable the file reads or sets through os.environ or os.getenv."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        text = ast.unparse(node)
        if isinstance(node, ast.Call) and re.match(r"os\.(environ\.(get|setdefault|pop)|getenv)\(", text):
            names.add(node.args[0].value)
        elif isinstance(node, ast.Call) and text.startswith("os.environ.update("):
            names |= {k.arg for k in node.keywords}
        elif isinstance(node, ast.Subscript) and text.startswith("os.environ["):
            names.add(node.slice.value)
        elif isinstance(node, ast.Compare) and text.endswith(" in os.environ"):
            names.add(node.left.value)
    return names


@pytest.mark.parametrize("example", EXAMPLES)
def test_public_deepspeed_api_and_no_test_only_environment(example):
    for path in (REPO / example).glob("*.py"):
        assert not private_deepspeed_access(path), (path.name, private_deepspeed_access(path))
        assert environment_names(path) <= ENV_ALLOWED, (path.name, environment_names(path) - ENV_ALLOWED)


def test_the_checks_above_see_what_they_look_for(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nengine._config.x = 1\ntorch._foreach_copy_(a, b)\n"
                     "os.environ.get('DS_EXAMPLES_NAN')\nos.environ['RANK']\n"
                     f"# {WORKAROUNDS}\nengine._allowed_here = 2\n")
    assert private_deepspeed_access(probe) == ["line 2: ._config"]
    assert environment_names(probe) == {"DS_EXAMPLES_NAN", "RANK"}


# Where two scripts do the same job they use the same code, so a diff between two examples shows only
# what differs (CONTRACT.md). These definitions must stay identical (source text).
ALL = ("01_basic_convnet", "02_cifar10", "03_cifar10_basic")
SHARED = {
    ALL: ["UsageError", "Parser", "say", "first_line", "check_config", "fill_schedule",
          "setup_distributed", "watch_launcher", "parent_pid", "rank0_first", "DeviceBatches",
          "plain_weights", "TrainingDiverged", "optimizer_step", "global_means", "evaluate",
          "check_output_dir", "claim_output_dir", "settle_set_aside", "release_output_dir",
          "read_checkpoint", "take_flags", "identity", "data_fingerprint",
          "restore", "save_epoch", "atomic_write", "write_metrics", "plot_curves", "init_wandb",
          "report", "run", "refuse_fp16_without_zero", "check_keys_deepspeed_reads",
          "quiet_known_messages", "release_shm_buffer", "from_a_collective"],
    ("01_basic_convnet", "03_cifar10_basic"): ["load_config", "RunState", "forward_loss", "predict",
                                               "quality"],
    ("01_basic_convnet", "02_cifar10"): ["train_batches"],
    ("02_cifar10", "03_cifar10_basic"): ["load_cifar10", "load_imagefolder", "read_cache",
                                         "decode_images", "decode_image", "synthetic", "normalize"],
}


@functools.cache
def top_level_defs(path):
    src = path.read_text()
    return {n.name: ast.get_source_segment(src, n) for n in ast.parse(src).body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("examples,name", [(ex, name) for ex, names in SHARED.items() for name in names])
def test_shared_code_is_identical(examples, name):
    versions = {e: top_level_defs(SCRIPTS[e]).get(name) for e in examples}
    assert all(versions.values()), f"{name} missing in {[e for e, v in versions.items() if not v]}"
    drifted = [e for e in examples[1:] if versions[e] != versions[examples[0]]]
    assert not drifted, f"{name} differs between {examples[0]} and {drifted}: keep the scripts parallel"


def test_scripts_have_the_same_sections_in_order():
    sections = {e: re.findall(r"^# =+ (.+)$", p.read_text(), re.M) for e, p in SCRIPTS.items()}
    assert len(set(map(tuple, sections.values()))) == 1, sections
    assert sections["01_basic_convnet"][0] == "settings" and sections["01_basic_convnet"][-1] == WORKAROUNDS
