"""benchmarks/bench.py on the CPU: seed 002's pipeline as written and the plain PyTorch loop, a few steps each
on tiny random data, end to end through bench.json and bench.md. The examples themselves are not run here
(their suites do that). ~20 s once DeepSpeed's CPU comm op is cached in ~/.cache/torch_extensions; the
first DeepSpeed start on a machine compiles it (~60-100 s on 2 cores)."""

import json
import math
import subprocess
import sys

import pytest
from harness import REPO, offline_env

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
