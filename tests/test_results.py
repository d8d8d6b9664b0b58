"""results/: the index is current, every folder is complete, and the H200 figures the READMEs and docs
quote come from a measured row (results/README.md says how the rows were made)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"
INDEX = json.loads((RESULTS / "index.json").read_text())
PAGES = [REPO / "README.md", *sorted(REPO.glob("0*/README.md")), *sorted((REPO / "docs" / "docs").glob("*.md"))]
FOLDERS = sorted(p for ex in ("01_basic_convnet", "02_cifar10", "03_cifar10_basic")
                 for p in (RESULTS / ex).iterdir() if p.is_dir())


def test_index_and_table_are_current():
    r = subprocess.run([sys.executable, "results/collect.py", "--check"], cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_folder_is_named_after_what_it_measured_and_holds_the_run(folder):
    hardware, recipe, precision = folder.name.split("-")
    assert hardware in INDEX["hardware"] and precision in ("fp32", "fp16", "bf16"), folder.name
    command = (folder / "command.sh").read_text()
    script = re.search(r"deepspeed --num_gpus=\d+ (\S+/train_ds\.py)", command)
    assert script and script[1] == f"{folder.parent.name}/train_ds.py", command
    if precision != "fp32" and "--dtype" in command:
        assert f"--dtype {precision}" in command
    if (folder / "timing.json").exists():
        files = {p.name for p in folder.iterdir()}
        assert {"console.log", "metrics.json", "curves.png", "timing.json"} <= files, files
        metrics = json.loads((folder / "metrics.json").read_text())
        cfg = metrics["config"]
        trained = next((k for k in ("fp16", "bf16") if cfg.get(k, {}).get("enabled")), "fp32")
        assert metrics["example"] == folder.parent.name and trained == precision, (trained, precision)
        assert "Training finished" in (folder / "console.log").read_text()


def quoted_figures(text):
    """(line, kind, value) for each accuracy (81.12%) and time (57.8 s) on a line naming an H100 or H200."""
    for line in text.splitlines():
        if "H200" in line or "H100" in line:
            for a in re.findall(r"(\d+\.\d\d) ?%", line):
                yield line, "accuracy", float(a)
            for t in re.findall(r"(\d+\.\d) s\b", line):
                yield line, "time", float(t)


def measured():
    acc, times = set(), set()
    for r in INDEX["rows"]:
        acc |= {r["test_accuracy"], r["median_test_accuracy"], *(x["test_accuracy"] for x in r["all_runs"])}
        times |= {r["launcher_to_exit_s"], r["worst_launcher_to_exit_s"], r["script_wall_s"],
                  *(x[k] for x in r["all_runs"] for k in ("launcher_to_exit_s", "script_wall_s"))}
    return {"accuracy": {round(a, 2) for a in acc}, "time": {round(t, 1) for t in times}}


def test_quoted_h200_figures_come_from_a_row():
    known, bad, seen = measured(), [], 0
    for page in PAGES:
        for line, kind, value in quoted_figures(page.read_text()):
            seen += 1
            if value not in known[kind]:
                bad.append(f"{page.relative_to(REPO)}: {kind} {value} in {line.strip()[:120]!r}")
    assert seen, "no README or docs page quotes an H200 figure"
    assert not bad, "figures that no row of results/index.json holds:\n" + "\n".join(bad)


def test_figure_check_catches_a_wrong_number():
    known = measured()
    row = INDEX["rows"][0]
    line = f"On one H200: {row['test_accuracy']:.2f}% in {row['launcher_to_exit_s'] + 0.1:.1f} s"
    found = list(quoted_figures(line))
    assert [k for _, k, v in found if v in known[k]] == ["accuracy"]
    assert [k for _, k, v in found if v not in known[k]] == ["time"]


def test_nothing_is_named_after_a_round_of_work():
    names = [str(p.relative_to(RESULTS)) for p in RESULTS.rglob("*")]
    texts = [p.read_text() for p in RESULTS.rglob("*") if p.suffix in (".md", ".sh", ".json", ".py")]
    pattern = r"(?i)\bs4[a-h]\b|\bcmd\d\b|h100_s4|session \d"
    assert not [n for n in names if re.search(pattern, n)]
    assert not [m for t in texts for m in re.findall(pattern, t)]
