"""Index the measured runs: results/<example>/<hardware>-<recipe>-<precision>/ -> results/index.json and
the table in results/README.md.

  python results/collect.py           # rewrite both from the folders
  python results/collect.py --check   # exit 1 if either is out of date (tests/test_results.py runs this)

A folder holds command.sh (the exact command, run from the repository root), console.log, metrics.json
and curves.png of its run, and timing.json: every run's launcher-to-exit seconds (timed around the
`deepspeed` command) and the script's own wall seconds (metrics.json's wall_time_s). results/measure.sh
makes them on a GPU machine. A folder with only command.sh is listed as not measured yet."""

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLES = ("01_basic_convnet", "02_cifar10", "03_cifar10_basic")


def row(folder):
    """One index row from a measured folder (numbers of the median run; all runs' in `runs`)."""
    hardware, recipe, precision = folder.name.split("-")
    timing = json.loads((folder / "timing.json").read_text())
    final = json.loads((folder / "metrics.json").read_text())["final"]
    exits = [r["launcher_to_exit_s"] for r in timing["runs"]]
    return {
        "example": folder.parent.name, "recipe": recipe, "precision": precision, "hardware": hardware,
        "folder": str(folder.relative_to(HERE)),
        "epochs": final["epochs_completed"], "test_accuracy": round(final["test_accuracy"], 2),
        "launcher_to_exit_s": statistics.median(exits),
        "script_wall_s": round(final["wall_time_s"], 1),
        "runs": len(exits), "worst_launcher_to_exit_s": max(exits),
        "median_test_accuracy": statistics.median(r["test_accuracy"] for r in timing["runs"]),
        "all_runs": timing["runs"],
        "seeds": [r["seed"] for r in timing["runs"] if r.get("seed") is not None],
        "files_of_run": timing["median_run"],
        "concurrent": timing.get("concurrent", False),
    }


def collect():
    rows, pending = [], []
    for example in EXAMPLES:
        for folder in sorted(p for p in (HERE / example).iterdir() if p.is_dir()):
            if (folder / "timing.json").is_file():
                rows.append(row(folder))
            else:
                pending.append(str(folder.relative_to(HERE)))
    return {"hardware": json.loads((HERE / "hardware.json").read_text()), "rows": rows,
            "not_measured": pending}


def table(index):
    lines = ["| example | recipe | precision | hardware | epochs | test accuracy | launcher to exit | "
             "script wall | folder |", "|---|---|---|---|---|---|---|---|---|"]
    for r in index["rows"]:
        exit_s = f"{r['launcher_to_exit_s']:.1f} s"
        accuracy = f"{r['test_accuracy']:.2f}%"
        if r["runs"] > 1:
            exit_s += f" (median of {r['runs']}; worst {r['worst_launcher_to_exit_s']:.1f} s)"
        if r["seeds"]:  # the median over the seeds; the folder's files are one seed's run
            spread = [x["test_accuracy"] for x in r["all_runs"]]
            files = r["all_runs"][r["files_of_run"] - 1]["seed"]
            accuracy = (f"{r['median_test_accuracy']:.2f}% (median of seeds "
                        f"{', '.join(map(str, r['seeds']))}: {min(spread):.2f}-{max(spread):.2f}%; "
                        f"files: seed {files})")
        if r["concurrent"]:
            exit_s += " (its runs at once on one GPU)"
        lines.append(f"| {r['example']} | {r['recipe']} | {r['precision']} | {r['hardware']} | "
                     f"{r['epochs']} | {accuracy} | {exit_s} | {r['script_wall_s']:.1f} s | "
                     f"[{r['folder']}]({r['folder']}/) |")
    return "\n".join(lines)


def readme(index):
    hw = "\n".join(f"- `{k}`: {v}" for k, v in index["hardware"].items())
    todo = "\n".join(f"- [`{p}`]({p}/command.sh)" for p in index["not_measured"]) or "- none"
    return f"""# Results

Every run here was made with the command in its folder's `command.sh`, from the repository root,
through the `deepspeed` launcher the READMEs tell you to use, after one warm-up run on the machine
(`results/measure.sh` runs them). Each folder holds that command, the run's `console.log` (per-step
lines and the launcher's environment dump removed; warnings kept), its `metrics.json` and `curves.png`,
and `timing.json` with every repeat. *Launcher to exit* is timed around the `deepspeed` command;
*script wall* is the script's own training-loop time (`wall_time_s` in metrics.json). Where a row ran
several times, the files and the accuracy are those of the run with the median launcher-to-exit time;
where it ran once per seed, of the run with the median accuracy, with the seeds' spread beside it.
Rows marked "at once" ran side by side with other runs on one GPU (small CPU-bound batches; each
launch on its own `--master_port`): their times include waiting for each other and are not the time
of a run alone.

The `h200` rows measured the scripts as they were before the three examples became rungs of one
ladder (committed in 911bf29, 2026-12-02); the `h100` rows measure the
scripts at commit 8aad5b9 (2026-12-06). The two kinds of card are not compared here.

The CIFAR-10 runs read a public JPEG export of CIFAR-10 (50,000 train and 10,000 test images, 32x32,
in `train/<class>/` and `test/<class>/`), not the official pickled batches, which cannot be downloaded
on these machines. JPEG is lossy, so its pixels differ slightly from the official files, and
accuracies measured on it can sit a little below those on the official data.

`results/benchmarks/` holds step, phase and recipe studies, each folder with its own README and
named after the card that ran it; they are not rows of the table.

This file and `index.json` are written by `python results/collect.py`; `tests/test_results.py` checks
they are current and that the accuracy and time figures the READMEs and docs quote come from a row.

Hardware:
{hw}

{table(index)}

Not measured on the current code yet (the command is ready):
{todo}

Benchmark outputs (step-time studies, the plain-PyTorch comparison) are in
[`benchmarks/`](benchmarks/), one folder per machine.
"""


def main():
    index = collect()
    files = {HERE / "index.json": json.dumps(index, indent=1) + "\n", HERE / "README.md": readme(index)}
    if "--check" in sys.argv:
        stale = [p.name for p, text in files.items() if not p.is_file() or p.read_text() != text]
        if stale:
            sys.exit(f"results/{' and results/'.join(stale)} out of date: run python results/collect.py")
        print("results index is current")
        return
    for path, text in files.items():
        path.write_text(text)
    print(f"{len(index['rows'])} rows -> results/index.json, results/README.md")


if __name__ == "__main__":
    main()
