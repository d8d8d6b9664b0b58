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
# Caps that later work must keep too (lines include the docstring and comments): a ratchet at
# what the rungs are now. The ladder's targets (STYLE.md: 03 400, 01 500, 02 1,100 with a lesson of
# 650) are not met: the core contract's plumbing alone is about 430 lines in every rung.
CAPS = {"lines": {"01_basic_convnet": 1068, "02_cifar10": 1468, "03_cifar10_basic": 965},
        "main": 80, "other_function": 50, "line": 100}
WORKAROUNDS = "DeepSpeed 0.19.8 workarounds"
# Environment variables an example may read: the launcher's and Weights & Biases' own.
ENV_ALLOWED = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
               "MASTER_PORT",
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
    ALL: ["Parser", "say", "first_line", "parent_pid", "rank0_first",
          "plain_weights", "atomic_write", "plot_curves", "refuse_fp16_without_zero",
          "quiet_known_messages", "release_shm_buffer",
          "from_a_collective", "save_failed",
          # the lean core: input, the output-dir guard, --resume's identity, stopping
          "UsageError", "setup_distributed", "read_config", "choose_precision",
          "check_with_deepspeed", "config_errors_in_one_line", "restore", "take_flags",
          "identity", "check_output_dir", "claim_output_dir", "settle_set_aside",
          "release_output_dir", "watch_launcher", "exit_on_sigterm", "quality"],
    # 01 is 03's core and lesson with the training features around them
    ("01_basic_convnet", "03_cifar10_basic"): ["train_batches", "evaluate", "save_epoch",
                                               "write_metrics", "read_checkpoint",
                                               "shard_for_the_ranks",
                                               "data_fingerprint", "load_config", "run",
                                               "stop_loader_workers", "quiet_a_stopped_handover"],
    # 02 keeps its own plumbing; with 01 it shares the training features it has too
    ("01_basic_convnet", "02_cifar10"): ["fill_schedule", "init_wandb"],
    # 01 names its own cause of divergence (--max-bad-steps in a row)
    ("02_cifar10", "03_cifar10_basic"): ["TrainingDiverged"],
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


STEPDOWN = EXAMPLES  # every rung reads top-down (STYLE.md)
# 02, the template, puts its plumbing below a fence line; the lesson above it has a cap of its own.
PLUMBING = "# ===== plumbing: "
FENCED = {"02_cifar10": 650}  # lines above the fence, docstring and imports included


def stepdown_problems(src, lesson_cap=None):
    """Where `src` does not read top-down (STYLE.md): main() is the first function; every definition
    sits below the first definition that uses it (exception types, used everywhere, come first; run(),
    the command around main(), counts as above main(): it reads the flags and calls main()); the steps
    that only main() uses follow it in the order it calls them, down to the plumbing fence if there
    is one; the workarounds section comes last. With lesson_cap: the fence line exists, at most
    lesson_cap lines sit above it, and every call written `deepspeed.X(...)` or `engine.X(...)` sits
    above it or in the workarounds section."""
    tree = ast.parse(src)
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    users = {name: [] for name in defs}
    calls = []  # main's uses of the script's own definitions, in order
    for user in defs.values():
        for node in ast.walk(user):
            if isinstance(node, ast.Name) and node.id in defs and node.id != user.name:
                users[node.id].append(user)
                if user.name == "main":
                    calls.append((node.lineno, node.col_offset, node.id))
    problems = []
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    if not functions or functions[0].name != "main":
        problems.append("main() is not the first function")
    for name, node in defs.items():
        errors = isinstance(node, ast.ClassDef) and any(
            getattr(b, "id", "").endswith(("Error", "Exception")) for b in node.bases)
        if name in ("main", "run") or errors:
            continue
        if not users[name]:
            problems.append(f"{name} is used by no definition")
        elif min(0 if u.name == "run" else u.lineno for u in users[name]) > node.lineno:
            problems.append(f"{name} sits above its first user {min(users[name], key=lambda u: u.lineno).name}")
    fence = re.search(rf"^# .*{WORKAROUNDS}$", src, re.M)
    line = src[:fence.start()].count("\n") + 1 if fence else len(src.splitlines())
    if not fence:
        problems.append("no workarounds section")
    below = [n for n in tree.body if n.lineno > line and not isinstance(n, (ast.FunctionDef, ast.If))]
    problems += [f"line {n.lineno} is no workaround but below their section" for n in below]
    steps_end = line  # main's steps are in order down to here
    if lesson_cap is not None:
        plumbing = re.search(rf"^{re.escape(PLUMBING)}", src, re.M)
        steps_end = src[:plumbing.start()].count("\n") + 1 if plumbing else line
        if not plumbing:
            problems.append("no plumbing fence")
        elif steps_end - 1 > lesson_cap:
            problems.append(f"{steps_end - 1} lines above the plumbing fence (cap {lesson_cap})")
        hidden = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and steps_end < n.lineno < line
                  and re.match(r"(deepspeed|engine)\.", ast.unparse(n.func))]
        problems += [f"line {n.lineno}: {ast.unparse(n.func)} is below the fence" for n in hidden]
    steps = [name for _, _, name in sorted(calls)  # the workarounds keep to their own section
             if {u.name for u in users[name]} == {"main"} and defs[name].lineno < steps_end
             and isinstance(defs[name], ast.FunctionDef)]  # a class is a type, not a step
    steps = list(dict.fromkeys(steps))
    if [defs[n].lineno for n in steps] != sorted(defs[n].lineno for n in steps):
        problems.append(f"main's steps are not in the order main calls them: {steps}")
    return problems


@pytest.mark.parametrize("example", STEPDOWN)
def test_script_reads_top_down(example):
    problems = stepdown_problems(SCRIPTS[example].read_text(), FENCED.get(example))
    assert not problems, problems


def test_the_stepdown_check_sees_what_it_looks_for():
    good = ("class UsageError(Exception):\n    pass\n\n\ndef main():\n    a()\n    b()\n\n\n"
            "def a():\n    c()\n\n\ndef b():\n    raise UsageError\n\n\ndef c():\n    pass\n\n\n"
            "def run():\n    main()\n\n\n# " + WORKAROUNDS + "\n")
    assert stepdown_problems(good) == []
    swapped = good.replace("    a()\n    b()", "    b()\n    a()")
    assert stepdown_problems(swapped) == ["main's steps are not in the order main calls them: ['b', 'a']"]
    helper_first = good.replace("def c():\n    pass\n\n\n", "").replace(
        "def main():", "def c():\n    pass\n\n\ndef main():")
    assert stepdown_problems(helper_first) == ["main() is not the first function", "c sits above its first user a"]
    assert stepdown_problems(good, lesson_cap=30) == ["no plumbing fence"]
    fenced = good.replace("def b():", PLUMBING + "b and c\ndef b():")
    assert stepdown_problems(fenced, lesson_cap=30) == []
    assert stepdown_problems(fenced, lesson_cap=10) == ["13 lines above the plumbing fence (cap 10)"]
    hidden = fenced.replace("def c():\n    pass", "def c():\n    engine.step()\n    deepspeed.init()")
    assert stepdown_problems(hidden, lesson_cap=30) == ["line 20: engine.step is below the fence",
                                                        "line 21: deepspeed.init is below the fence"]
    # below the fence, main's steps may come in any order; above it they may not
    assert stepdown_problems(fenced.replace("    a()\n    b()", "    b()\n    a()"), 30) == []


def test_the_interpreter_forks_safely():
    """DeepSpeed's loader forks its workers while gloo's threads run. CPython before 3.12 (3.11.10,
    3.10.15) can leave the forked worker waiting for a lock held by a thread that entered Python
    at that moment (gh-112275): the battery then hangs about one launch in thirty. .python-version
    asks for 3.12; this fails the suite where another interpreter runs it."""
    fixed = {(3, 10): 15, (3, 11): 10}  # the patch release with the fix, before 3.12
    v = sys.version_info
    assert v >= (3, 12) or v.micro >= fixed.get(v[:2], 10**6), (
        f"Python {sys.version.split()[0]} has CPython's fork deadlock (gh-112275): use 3.12 or later")
