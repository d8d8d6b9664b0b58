"""docs/: quoted code still matches the scripts, shown commands use real flags, results tables match their
JSON files, and the Docusaurus site builds and renders (code blocks and the training-curve image).

Conventions the pages follow (docs/docs/*.md):
  ```python title="01_basic_convnet/train_ds.py"     a block quoted from that file; every line must occur in
                                                    it, consecutive lines consecutively; a line `...` (or
                                                    `# ...`) marks a cut between quoted runs
  <!-- results: PATH.json -->                        the next table's numbers all come from PATH (repo root)
  <!-- walk: 03_cifar10_basic/train_ds.py -->         the next table names, in its first column, every
                                                    top-level function and class of that file in order
  front matter `example: 01_basic_convnet`           a bare `train_ds.py` in a command means that example's
  ![alt](RELATIVE/PATH.png)                         an image, by its path from the .md file (not /img/...): it
                                                    renders on the code host (GitHub) and in the site
Shell blocks: a `train_ds.py` command may use only flags its --help lists; every `deepspeed` command, whatever
it launches, only launcher flags (those before the script path) that the pinned DeepSpeed's --help lists.
The build and the rendering (`pytest -m site`) need npm and Chromium (`apt-get install -y chromium`).
"""

import ast
import contextlib
import functools
import http.server
import io
import json
import math
import os
import re
import shlex
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
import urllib.parse
import urllib.request
import xml.etree.ElementTree
from pathlib import Path

import pytest
from harness import load_example

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = sorted((DOCS / "docs").rglob("*.md"))
SCREENSHOT_PAGE = "01-basic-convnet/"  # route of the page whose rendering is checked
CURVE_IMG = "01_basic_convnet_cpu_curves.png"

FENCE = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```\s*$", re.M | re.S)
TITLE = re.compile(r'title="([^"]+)"')
RESULTS = re.compile(r"<!--\s*results:\s*(\S+?)\s*-->\s*\n((?:\|[^\n]*\|[ \t]*\n?)+)")
NUMBER = re.compile(r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?(?![\w.])")
SHELL_STOP = {"|", "||", "&&", ";", ">", ">>", "2>&1", "&", "<"}


def norm(line):
    return " ".join(line.split())


def front_matter(text):
    m = re.match(r"---\n(.*?)\n---\n", text, re.S)
    return dict(re.findall(r"^(\w+):\s*(.+?)\s*$", m.group(1), re.M)) if m else {}


def blocks(text):
    """(language, info string, body) of every fenced code block."""
    return [(m.group(1), m.group(2), m.group(3)) for m in FENCE.finditer(text)]


# ---------------------------------------------------------------------------- (a) quoted code
def quote_problems(body, source_text):
    """Lines of `body` that are not in `source_text` (whitespace-normalized per line); runs between `...`
    cut lines must occur consecutively and in order."""
    src = [norm(line) for line in source_text.splitlines() if norm(line)]  # blank lines do not count
    runs, run = [], []
    for line in body.splitlines():
        if norm(line) in ("...", "# ..."):
            runs.append(run)
            run = []
        elif norm(line):
            run.append(norm(line))
    runs.append(run)
    problems, pos = [], 0
    for run in filter(None, runs):
        hit = next((i for i in range(pos, len(src) - len(run) + 1)
                    if src[i:i + len(run)] == run), None)
        if hit is None:
            missing = [line for line in run if line not in src]
            problems.append(missing[0] if missing else f"lines not consecutive/in order: {run[0]!r}...")
        else:
            pos = hit + len(run)
    return problems


def quoted_blocks():
    for page in PAGES:
        for _lang, info, body in blocks(page.read_text()):
            m = TITLE.search(info)
            if m and "/" in m.group(1):
                yield page, m.group(1), body


def test_quote_checker_catches_drift():
    src = "def f(x):\n    y = x + 1\n    return y\n\nprint(f(2))\n"
    assert quote_problems("def f(x):\n  y = x  +  1\n...\nprint(f(2))\n", src) == []
    assert quote_problems("def f(x):\n    y = x + 2\n", src) == ["y = x + 2"]
    assert quote_problems("def f(x):\n    return y\n", src)  # not consecutive
    assert quote_problems("print(f(2))\n...\ndef f(x):\n", src)  # out of order


def test_docs_quote_scripts_verbatim():
    found = list(quoted_blocks())
    assert any(path.endswith("train_ds.py") for _, path, _ in found), "no page quotes a train_ds.py"
    bad = []
    for page, path, body in found:
        f = REPO / path
        if not f.is_file():
            bad.append(f"{page.name}: quotes {path}, which does not exist")
            continue
        bad += [f"{page.name}: {path}: {p!r}" for p in quote_problems(body, f.read_text())]
    assert not bad, "docs quote code that is no longer in the file:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------- (b) commands and flags
@functools.cache
def script_flags(example):
    """Every option string the example's --help lists (argparse), plus -h; read in this process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        load_example(example).parse_args(["--help"])
    return frozenset(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", out.getvalue()))


@functools.cache
def launcher_help(launcher):
    """`deepspeed --help` / `torchrun --help` of the installed (pinned) versions, run once."""
    mod = {"deepspeed": "deepspeed.launcher.runner", "torchrun": "torch.distributed.run"}[launcher]
    p = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def launcher_flags(launcher):
    return frozenset(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", launcher_help(launcher)))


def help_options(help_text):
    """{option: takes a value} from an argparse --help text's option lines (`-H HOSTFILE, --hostfile
    HOSTFILE`, `--no_ssh`, `--autotuning {tune,run}`)."""
    opts = {}
    for line in help_text.splitlines():
        m = re.match(r"\s{1,4}(-[^\s,].*?)(?:\s{2,}|$)", line)
        for spec in m.group(1).split(", ") if m else ():
            name, _, metavar = spec.partition(" ")
            if re.fullmatch(r"--?[A-Za-z][\w-]*", name):
                opts[name] = bool(metavar)
    return opts


COMMAND_PREFIXES = {"env", "nohup", "time", "sudo", "exec"}


def deepspeed_launches(cmd, options):
    """(launcher flags, script) for each `deepspeed` command in one command line: the options between
    `deepspeed` and the script path it launches. `options` is {flag: takes a value}; an unknown
    flag is kept (and reported), assumed to take no value."""
    try:
        tokens = shlex.split(cmd)
    except ValueError:
        return
    starts = [0] + [i + 1 for i, t in enumerate(tokens) if t in SHELL_STOP]
    for i in starts:
        while i < len(tokens) and (tokens[i] in COMMAND_PREFIXES or re.match(r"\w+=", tokens[i])
                                   or tokens[i:i + 2] == ["uv", "run"]):
            i += 2 if tokens[i] == "uv" else 1
        if i >= len(tokens) or tokens[i].rsplit("/", 1)[-1] != "deepspeed":
            continue
        flags, j = [], i + 1
        while j < len(tokens) and tokens[j].startswith("-") and tokens[j] not in SHELL_STOP:
            name = tokens[j].split("=")[0]
            flags.append(name)
            j += 2 if "=" not in tokens[j] and options.get(name) else 1
        script = tokens[j] if j < len(tokens) and tokens[j] not in SHELL_STOP else None
        yield flags, script


def commands(body):
    """Shell command lines of a code block (continuations joined, prompts and comments dropped)."""
    text = re.sub(r"\\\n\s*", " ", body)
    for line in text.splitlines():
        line = re.sub(r"^\s*\$\s+", "", line)
        line = re.sub(r"\s+#.*$", "", line) if not line.lstrip().startswith("#") else ""
        if line.strip():
            yield line.strip()


def train_invocations(cmd, default_example, examples):
    """(example, launcher, launcher flags, script flags) for each train_ds.py run in one command line."""
    try:
        tokens = shlex.split(cmd)
    except ValueError:
        return
    cwd_example = default_example
    for i, tok in enumerate(tokens):
        if tok == "cd" and i + 1 < len(tokens):
            cwd_example = next((e for e in examples if e in tokens[i + 1]), cwd_example)
        if not tok.endswith("train_ds.py"):
            continue
        example = next((e for e in examples if e in tok), cwd_example)
        start = max((j + 1 for j in range(i) if tokens[j] in SHELL_STOP), default=0)
        pre = tokens[start:i]
        launcher = next((t.rsplit("/", 1)[-1] for t in pre if t.rsplit("/", 1)[-1] in ("deepspeed", "torchrun")),
                        None)
        lflags = [t.split("=")[0] for t in pre if t.startswith("-")] if launcher else []
        sflags = []
        for t in tokens[i + 1:]:
            if t in SHELL_STOP or t.startswith(">"):
                break
            if t.startswith("-") and not NUMBER.fullmatch(t):
                sflags.append(t.split("=")[0])
        yield example, launcher, lflags, sflags


def shown_invocations():
    examples = sorted(p.name for p in REPO.glob("0*_*") if p.is_dir())
    for page in PAGES:
        text = page.read_text()
        default = front_matter(text).get("example")
        for lang, info, body in blocks(text):
            if lang not in ("bash", "sh", "shell", "console") or TITLE.search(info):
                continue
            cwd = default  # a `cd 0X_...` line holds for the rest of the block
            for cmd in commands(body):
                for inv in train_invocations(cmd, cwd, examples):
                    yield page, cmd, inv
                cwd = next((e for e in examples if re.search(rf"\bcd\s+\S*{e}", cmd)), cwd)


def test_command_parser():
    ex = ["01_basic_convnet", "02_cifar10"]
    got = list(train_invocations("deepspeed --num_gpus=2 02_cifar10/train_ds.py --epochs 3 --dtype=bf16 2>&1 | tee x",
                                 None, ex))
    assert got == [("02_cifar10", "deepspeed", ["--num_gpus"], ["--epochs", "--dtype"])]
    got = list(train_invocations("cd 01_basic_convnet && python train_ds.py --resume", None, ex))
    assert got == [("01_basic_convnet", None, [], ["--resume"])]


def test_launcher_flag_parser():
    help_text = ("options:\n  -h, --help            show this help message and exit\n"
                 "  -H HOSTFILE, --hostfile HOSTFILE\n                        Hostfile path\n"
                 "  --num_gpus NUM_GPUS, --num_accelerators NUM_GPUS\n"
                 "  --no_ssh              Launch training independently on each node\n"
                 "  --autotuning {tune,run}\n                        Run DeepSpeed autotuner (default: )\n")
    opts = help_options(help_text)
    assert opts == {"-h": False, "--help": False, "-H": True, "--hostfile": True, "--num_gpus": True,
                    "--num_accelerators": True, "--no_ssh": False, "--autotuning": True}
    got = list(deepspeed_launches("deepspeed --hostfile hostfile --no_ssh --num_gpus=8 --bogus "
                                  "01_basic_convnet/train_ds.py --epochs 3 && uv run deepspeed -H h x.py", opts))
    assert got == [(["--hostfile", "--no_ssh", "--num_gpus", "--bogus"], "01_basic_convnet/train_ds.py"),
                   (["-H"], "x.py")]
    assert list(deepspeed_launches("CUDA_VISIBLE_DEVICES=0,1 nohup deepspeed --no_ssh a.py > log", opts)) == \
        [(["--no_ssh"], "a.py")]
    assert list(deepspeed_launches("pip install deepspeed --upgrade", opts)) == []  # not a launch


def test_docs_deepspeed_commands_use_real_launcher_flags():
    """Every `deepspeed` command shown, whatever it launches: the flags before the script path are
    ones the pinned DeepSpeed's launcher lists in its --help."""
    options = help_options(launcher_help("deepspeed"))
    assert {"--hostfile", "--no_ssh", "--include", "--num_gpus"} <= options.keys(), "help not parsed"
    shown, bad = 0, []
    for page in PAGES:
        for lang, info, body in blocks(page.read_text()):
            if lang not in ("bash", "sh", "shell", "console") or TITLE.search(info):
                continue
            for cmd in commands(body):
                for flags, script in deepspeed_launches(cmd, options):
                    shown += 1
                    bad += [f"{page.name}: deepspeed has no flag {f}: {cmd}" for f in flags if f not in options]
                    if script is None:
                        bad.append(f"{page.name}: no script after the launcher flags: {cmd}")
    assert shown >= 10, "expected the pages to show deepspeed launches"
    assert not bad, "\n".join(bad)


def test_docs_commands_use_real_flags():
    shown = list(shown_invocations())
    assert len(shown) >= 10, "expected the pages to show launch commands"
    bad = []
    for page, cmd, (example, launcher, lflags, sflags) in shown:
        if example is None:
            bad.append(f"{page.name}: cannot tell which example runs: {cmd}")
            continue
        if not (REPO / example / "train_ds.py").is_file():
            bad.append(f"{page.name}: {example}/train_ds.py does not exist: {cmd}")
            continue
        bad += [f"{page.name}: {example}/train_ds.py has no flag {f}: {cmd}"
                for f in sflags if f not in script_flags(example)]
        if launcher:
            bad += [f"{page.name}: {launcher} has no flag {f}: {cmd}" for f in lflags if f not in launcher_flags(launcher)]
    assert not bad, "\n".join(bad)


def test_cited_tests_exist():
    """Pages back claims with test ids (tests/test_x.py::test_name[param]); each named test must exist."""
    cited = {(page.name, f, name) for page in PAGES
             for f, name in re.findall(r"(tests/test_\w+\.py)::(\w+)", page.read_text())}
    assert cited, "no page cites a test"
    bad = [f"{page}: {f}::{name}" for page, f, name in sorted(cited)
           if not (REPO / f).is_file() or not re.search(rf"^def {name}\(", (REPO / f).read_text(), re.M)]
    assert not bad, "pages cite tests that do not exist:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------- (a2) walks through a script
WALK = re.compile(r"<!--\s*walk:\s*(\S+?)\s*-->\s*\n((?:\|[^\n]*\|[ \t]*\n?)+)")


def top_level_names(source_text):
    """The script's top-level functions and classes, in file order."""
    return [node.name for node in ast.parse(source_text).body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]


def walked_names(table):
    """The name in backticks that opens each body row's first cell (`main` or `main(args)`); a row
    whose first cell is bold (`**plumbing: ...**`) names a part of the file and is skipped."""
    names = []
    for row in table.strip().splitlines()[2:]:
        if re.match(r"\|\s*\*\*", row):
            continue
        m = re.match(r"\|\s*`([A-Za-z_]\w*)", row)
        names.append(m.group(1) if m else row.strip()[:40])
    return names


def test_walk_checker_catches_a_missing_or_moved_function():
    src = "X = 1\n\nclass A:\n    def m(self): pass\n\ndef main(): pass\n\ndef b(): pass\n"
    assert top_level_names(src) == ["A", "main", "b"]
    table = "| In the file | What |\n|---|---|\n| `A` | a |\n| `main()` | m |\n| **plumbing** | |\n| `b(x)` | b |\n"
    assert walked_names(table) == ["A", "main", "b"]
    assert walked_names(table.replace("`b(x)`", "b")) == ["A", "main", "| b | b |"]  # a row without a name
    assert walked_names(table.replace("| `main()` | m |\n", "")) != top_level_names(src)


def existing(marks, what):
    """Marked (page, path, table) triples split: those whose file exists, with the file, and a
    problem line for each of the others."""
    found, bad = [], []
    for page, path, table in marks:
        f = REPO / path
        if f.is_file():
            found.append((page, path, table, f))
        else:
            bad.append(f"{page.name}: {what} {path}, which does not exist")
    return found, bad


def test_example_pages_walk_their_script_top_to_bottom():
    """A walk table lists every top-level function and class of its script in the file's order, so a
    reader can follow the page and the file side by side, and a renamed, added or moved function
    shows here."""
    walks = [(page, m.group(1), m.group(2)) for page in PAGES for m in WALK.finditer(page.read_text())]
    assert walks, "no page walks a script (<!-- walk: PATH -->)"
    walks, bad = existing(walks, "walks")
    for page, path, table, f in walks:
        want, got = top_level_names(f.read_text()), walked_names(table)
        if want != got:
            missing = [n for n in want if n not in got]
            extra = [n for n in got if n not in want]
            bad.append(f"{page.name}: {path}: missing {missing}, not in the file {extra}"
                       if missing or extra else f"{page.name}: {path}: order differs from the file")
    assert not bad, "walk tables out of step with their scripts:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------- (c) results tables
def json_numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from json_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from json_numbers(v)


def table_problems(table, data):
    """Numbers in the table's body cells that no number in `data` rounds to (at the cell's precision)."""
    values = [v for v in json_numbers(data) if math.isfinite(v)]
    rows = [r for r in table.strip().splitlines()[2:]]  # skip header and |---| line
    problems = []
    for row in rows:
        for cell in row.strip().strip("|").split("|"):
            for num in NUMBER.findall(cell):
                s = num.replace(",", "")
                places = len(s.split(".")[1]) if "." in s else 0
                x = float(s)
                if not any(abs(round(v, places) - x) < 10 ** -(places + 3) for v in values):
                    problems.append(f"{num} (in {cell.strip()!r})")
    return problems


def results_tables():
    for page in PAGES:
        for m in RESULTS.finditer(page.read_text()):
            yield page, m.group(1), m.group(2)


def test_results_checker_catches_mismatch():
    data = {"final": {"test_accuracy": 91.23456, "epochs": 3, "n": 10000}}
    table = "| a | b |\n|---|---|\n| 91.23 | 3 |\n| 10,000 | 91.2 |\n"
    assert table_problems(table, data) == []
    assert table_problems("| a |\n|---|\n| 91.24 |\n", data) == ["91.24 (in '91.24')"]


def test_results_tables_match_their_files():
    tables = list(results_tables())
    assert tables, "no page marks a results table with <!-- results: PATH -->"
    tables, bad = existing(tables, "results file")
    for page, path, table, f in tables:
        bad += [f"{page.name}: {path}: {p}" for p in table_problems(table, json.loads(f.read_text()))]
    assert not bad, "results tables disagree with their files:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------- (d) images
IGNORED_DIRS = {".venv", "node_modules", "build", ".docusaurus", "runs", "data", ".git", ".pytest_cache"}
MARKDOWN = sorted(p for p in REPO.rglob("*.md") if not IGNORED_DIRS & set(p.relative_to(REPO).parts))
IMAGE = re.compile(r'!\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)|<img\b[^>]*\bsrc="([^"]+)"')


def rendered(text):
    """Markdown without its code blocks and inline code, where an image is only shown as text."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def image_problems(md_file, text):
    """Images a Markdown file shows (outside code) that are not a relative path from it to a
    file in the repository. The code host resolves an image against the .md file, so the site's
    static form (/img/x.png) or a URL shows a broken image there."""
    problems = []
    for m in IMAGE.finditer(rendered(text)):
        ref = m.group(1) or m.group(2)
        path = urllib.parse.unquote(ref.split("#")[0].split("?")[0])
        target = (md_file.parent / path).resolve()
        if re.match(r"[A-Za-z][\w+.-]*:", ref) or path.startswith("/"):
            problems.append(f"{ref}: not a relative path")
        elif REPO.resolve() not in target.parents:
            problems.append(f"{ref}: outside the repository")
        elif not target.is_file():
            problems.append(f"{ref}: no such file")
        elif target.suffix == ".svg" and not svg_parses(target):
            problems.append(f"{ref}: not well-formed SVG")
    return problems


def svg_parses(path):
    """A hand-written SVG is XML: a browser shows nothing for one that does not parse."""
    try:
        root = xml.etree.ElementTree.parse(path).getroot()
    except xml.etree.ElementTree.ParseError:
        return False
    return root.tag == "{http://www.w3.org/2000/svg}svg"


def test_image_checker_catches_paths_that_do_not_render(tmp_path):
    page = REPO / "docs" / "docs" / "index.md"  # a real location; the text is made up
    assert image_problems(page, "![curves](../static/img/01_basic_convnet_cpu_curves.png)\n") == []
    assert image_problems(page, '<img src="../static/img/01_basic_convnet_cpu_curves.png" alt="c">') == []
    assert image_problems(page, "![c](/img/01_basic_convnet_cpu_curves.png)") == [
        "/img/01_basic_convnet_cpu_curves.png: not a relative path"]
    assert image_problems(page, "![c](https://example.invalid/c.png)")
    assert image_problems(page, "![c](../static/img/missing.png)") == ["../static/img/missing.png: no such file"]
    bad_svg = tmp_path / "bad.svg"
    bad_svg.write_text('<svg xmlns="http://www.w3.org/2000/svg"><text>a < b</text></svg>')
    assert not svg_parses(bad_svg)
    assert svg_parses(REPO / "docs" / "static" / "img" / "data-parallel-and-zero.svg")
    assert image_problems(page, "```markdown\n![c](/img/x.png)\n```\nor `![c](/img/x.png)`") == []  # code


def test_every_image_a_markdown_file_shows_exists_at_its_relative_path():
    assert any(p.parent.name == "docs" and p.parent.parent.name == "docs" for p in MARKDOWN)
    shown, bad = 0, []
    for md_file in MARKDOWN:
        text = md_file.read_text()
        shown += len(IMAGE.findall(rendered(text)))
        bad += [f"{md_file.relative_to(REPO)}: {p}" for p in image_problems(md_file, text)]
    assert shown >= 4, "expected the pages to show the training curves"
    assert not bad, "images that do not render on the code host:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------- (e) build and render
def test_site_config_fails_on_broken_links():
    cfg = (DOCS / "docusaurus.config.js").read_text()
    assert "onBrokenLinks: 'throw'" in cfg and "onBrokenMarkdownLinks: 'throw'" in cfg
    assert (DOCS / "package-lock.json").is_file()
    assert not list((DOCS / "docs").rglob("*.mdx")), "pages stay plain Markdown"


def missing(reason):
    """Skip locally; under CI (.ci/run sets CI=1 and installs the tools) a missing tool is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; .ci/run should have installed it")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def built_site():
    npm = shutil.which("npm")
    if npm is None:
        missing("npm is not installed: cannot build docs/")
    if not (DOCS / "node_modules").is_dir():
        p = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=DOCS, capture_output=True, text=True,
                           timeout=900)
        assert p.returncode == 0, f"npm ci failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    p = subprocess.run([npm, "run", "build"], cwd=DOCS, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"docs build failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return DOCS / "build"


@pytest.mark.site
def test_site_builds(built_site):
    for page in PAGES:
        text = page.read_text()
        slug = front_matter(text).get("slug", page.stem).strip("/")
        route = built_site / slug / "index.html" if slug else built_site / "index.html"
        assert route.is_file(), f"{page.name} did not become {route.relative_to(built_site)}"
    assert (built_site / "img" / CURVE_IMG).is_file()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def served_site(built_site):
    handler = functools.partial(_Quiet, directory=str(built_site))
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
        httpd.shutdown()


def chromium(*args):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        missing("chromium is not installed (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as profile:
        p = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                            "--disable-background-networking", "--disable-component-update", "--disable-sync",
                            "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                            *args], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.mark.site
def test_page_renders_code_and_curve(served_site, tmp_path):
    url = served_site + SCREENSHOT_PAGE
    dom = chromium("--dump-dom", url)
    assert "<pre" in dom and "<code" in dom, "no rendered code block"
    assert "Page Not Found" not in dom
    stem = re.escape(CURVE_IMG[:-len(".png")])  # Docusaurus serves it as /assets/images/<stem>-<hash>.png
    imgs = re.findall(r'<img[^>]*src="([^"]*' + stem + r'[^"]*\.png)"', dom)
    assert imgs, "training-curve <img> missing from the rendered page"
    with urllib.request.urlopen(urllib.parse.urljoin(url, imgs[0]), timeout=30) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "image/png"

    shot = tmp_path / "page.png"
    # tall enough for the whole page: the curve sits near the end, and lazy images load only in view
    chromium(f"--screenshot={shot}", "--window-size=1280,24000", "--hide-scrollbars", url)
    import numpy as np
    from PIL import Image

    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    rows = np.nonzero((px != px[:, :1]).any(axis=(1, 2)))[0]
    assert len(rows) > 1000, "screenshot looks blank"
    page = px[: rows[-1] + 1]
    r, g, b = page[..., 0], page[..., 1], page[..., 2]
    dark = ((r + g + b) < 150).mean()  # the vsDark code-block background is #1e1e1e
    # matplotlib's default line colours (C0 blue #1f77b4, C1 orange #ff7f0e) come only from the curve image
    blue = ((abs(r - 31) < 25) & (abs(g - 119) < 25) & (abs(b - 180) < 25)).sum()
    orange = ((abs(r - 255) < 25) & (abs(g - 127) < 25) & (b < 60)).sum()
    assert dark > 0.05, f"no dark code-block region in the screenshot ({dark:.2%} dark pixels)"
    assert blue > 200 and orange > 200, f"training curves not visible (blue {blue}, orange {orange} px)"
