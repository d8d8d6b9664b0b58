"""Stress tool (not a test): launch an example N times on 2 ranks through `deepspeed` (or 1 under
plain python) with a broken dataset, one busy process loading the CPU, and count the exit codes
(a data error must end in 2) and any "terminate called" in the output.

    uv run python tests/stress_exit_code.py 02_cifar10 --runs 32 [--python] [--no-load] [--keep DIR]

Each run keeps a core dump (ulimit -c unlimited, cwd = its own folder) and Python's faulthandler
traceback of every thread on SIGABRT, so a 134 can be read with `gdb python core`."""

import argparse
import collections
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import BIN, free_port, make_imagefolder, make_mnist_idx, offline_env, script  # noqa: E402


def broken_data(example, root, images):
    """(arguments, data folder) of a dataset that rank 0 refuses with exit code 2."""
    if example == "01_basic_convnet":
        make_mnist_idx(root)
        raw = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
        raw.write_bytes(raw.read_bytes()[:1000])
        return ["--dataset", "mnist", "--data-dir", root]
    make_imagefolder(root, n_train=images, n_test=12)  # 2,000 and more: decoded by a pool
    (root / "train" / "a" / "cut.jpg").write_bytes(b"not an image")
    return ["--dataset", "imagefolder", "--data-dir", root]


def busy(stop_at):
    while time.time() < stop_at:
        pass


def main():
    p = argparse.ArgumentParser()
    p.add_argument("example")
    p.add_argument("--runs", type=int, default=32)
    p.add_argument("--python", action="store_true", help="one rank under plain python instead")
    p.add_argument("--images", type=int, default=30, help="training images for 02/03")
    p.add_argument("--no-load", action="store_true")
    p.add_argument("--keep", type=Path, help="folder for the runs (default: a temporary one)")
    a = p.parse_args()
    top = a.keep or Path(tempfile.mkdtemp(prefix="stress-"))
    data_args = broken_data(a.example, top / "data", a.images)
    counts, start = collections.Counter(), time.time()
    load = None
    if not a.no_load:  # one busy process, bounded in time even if this script dies
        load = multiprocessing.Process(target=busy, args=(time.time() + 60 * a.runs,), daemon=True)
        load.start()
    env = {**offline_env(), "PYTHONFAULTHANDLER": "1"}
    try:
        for i in range(a.runs):
            d = top / f"run{i:03d}"
            d.mkdir()
            cmd = [str(BIN / "deepspeed"), "--num_gpus=2", f"--master_port={free_port()}"]
            if a.python:
                cmd = [sys.executable]
            cmd += [str(script(a.example)), *map(str, data_args), "--output-dir", str(d / "out")]
            unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
            p = subprocess.Popen(cmd, cwd=d, env=env, stdout=open(d / "stdout", "w"),
                                 stderr=open(d / "stderr", "w"), start_new_session=True,
                                 preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE,
                                                                       unlimited))
            try:
                rc = p.wait(timeout=300)
            except subprocess.TimeoutExpired:  # e.g. waiting for another build's extension lock
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                rc = "timeout"
            counts[rc] += 1
            terminate = "terminate called" in (d / "stderr").read_text()
            cores = [c.name for c in d.glob("core*")]
            print(f"run {i}: rc {rc}{' cores ' + str(cores) if cores else ''}"
                  f"{' (terminate called)' if terminate else ''}", flush=True)
            if rc == 2 and not cores and not terminate and not a.keep:
                shutil.rmtree(d)
    finally:
        if load:
            load.terminate()
    print(f"{a.example}: {dict(counts)} in {a.runs} runs, {time.time() - start:.0f} s, in {top}")


if __name__ == "__main__":
    main()
