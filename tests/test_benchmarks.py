"""benchmarks/bench.py on the CPU: seed 002's pipeline as written and the plain PyTorch loop, a few steps each
on tiny random data, end to end through bench.json and bench.md. The examples themselves are not run here
(their suites do that). ~20 s once DeepSpeed's CPU comm op is cached in ~/.cache/torch_extensions; the
first DeepSpeed start on a machine compiles it (~60-100 s on 2 cores)."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from harness import REPO, free_port, offline_env

PART_KEYS = ("what", "command", "rc", "wall_s", "batch", "epoch_s", "images_per_s", "step_ms", "extrapolated")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), "--cpu", "--only", "seed,plain",
                        "--out", str(out), "--seed-steps", "4", "--warmup-steps", "2", "--plain-epochs", "2"],
                       cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


@pytest.mark.timeout(600)
def test_bench_json_has_finite_positive_numbers(bench):
    doc = json.loads((bench / "bench.json").read_text())
    assert doc["cpu_mode"] is True
    for key in ("gpu", "torch", "deepspeed", "cpu_count", "git_commit", "date_utc"):
        assert key in doc["hardware"], doc["hardware"]
    assert "--only seed,plain" in doc["commands"][-1]
    assert set(doc["parts"]) == {"seed", "plain"}
    for name, part in doc["parts"].items():
        for key in PART_KEYS:
            assert key in part, (name, key, part)
        for key in ("wall_s", "epoch_s", "images_per_s", "step_ms"):
            assert math.isfinite(part[key]) and part[key] > 0, (name, key, part[key])
        assert part["rc"] == 0 and "error" not in part, part
    seed = doc["parts"]["seed"]
    assert seed["batch"] == 32 and seed["extrapolated"] and seed["timed_steps"] == 4 and seed["steps_per_epoch"] == 8
    assert seed["note"].startswith("4 of 8 steps timed")
    plain = doc["parts"]["plain"]
    assert plain["epochs_run"] == 2 and 0 < plain["train_step_ms"] <= plain["step_ms"]
    assert {t["key"] for t in doc["targets"]} == {"smoke_01_wall", "smoke_02_wall", "smoke_03_wall"}
    assert all(t["status"] == "n/a" for t in doc["targets"])  # the smokes were not selected


def test_bench_markdown_has_tables(bench):
    md = (bench / "bench.md").read_text()
    assert md.startswith("# Benchmark (CPU mode)")
    for needle in ("- hardware:", "- software: torch", "- command: `", "## Targets", "## Parts",
                   "| seed | seed 002 as written", "| plain | plain PyTorch loop", "extrapolated:"):
        assert needle in md, needle


def test_bench_merge_joins_reports_without_running(bench, tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), "--cpu", "--out", str(tmp_path),
                        "--merge", str(bench / "bench.json"), str(bench / "bench.json")],
                       cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert set(doc["parts"]) == {"seed", "plain"} and len(doc["commands"]) == 2
    assert (tmp_path / "bench.md").read_text().count("- command: `") == 2


PHASES_IN_ORDER = ["launcher_start", "launch_start", "worker_start", "first_line", "engine", "first_epoch",
                   "last_epoch", "report", "worker_exit", "launcher_exit"]


def test_phases_times_a_real_launch_in_order(tmp_path):
    """benchmarks/phases.py around 02 through the real launcher: every phase it can see on synthetic
    data (no cache file, so no `data` phase) is found, marked by the right line, and in order."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "phases.py"), "--out", str(tmp_path), "--",
           str(Path(sys.executable).parent / "deepspeed"), "--num_gpus=1", f"--master_port={free_port()}",
           "02_cifar10/train_ds.py", "--dataset", "synthetic", "--epochs", "2",
           "--deepspeed_config", "02_cifar10/ds_config_fast.json", "--output-dir", "{run_dir}"]
    p = subprocess.run(cmd, cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run = json.loads((tmp_path / "run1.json").read_text())
    times = run["phases"]
    assert list(times) == PHASES_IN_ORDER, times
    assert all(a <= b for a, b in zip(times.values(), list(times.values())[1:])), times
    lines = run["phase_lines"]
    assert lines["first_line"].startswith("Loading") and lines["engine"].startswith("DeepSpeed CNN training")
    assert re.match(r"epoch +1/2 ", lines["first_epoch"]) and re.match(r"epoch +2/2 ", lines["last_epoch"])
    assert lines["report"].startswith("Saved:") and (tmp_path / "runs" / "1" / "metrics.json").is_file()
    inside = run["in_process"]  # the script's own `phases:` line, seconds between its marks
    assert list(inside) == ["setup", "data", "engine", "first_epoch", "epochs", "report"], inside
    assert all(v >= 0 for v in inside.values()) and sum(inside.values()) < times["report"], inside
    workers = [q for q in run["processes"] if q["role"] == "worker"]
    assert len(workers) == 1 and "--local_rank=0" in workers[0]["cmdline"], run["processes"]
    summary = json.loads((tmp_path / "phases.json").read_text())
    assert [r["phase"] for r in summary["rows"]] == PHASES_IN_ORDER
    table = (tmp_path / "phases.md").read_text()
    assert "| worker_exit | report |" in table and "| launcher_exit | worker_exit |" in table
