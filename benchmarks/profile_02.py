"""Where 02's fast-recipe time goes (GPU): setup phases, and per-step cost next to the plain PyTorch loop.

    python benchmarks/profile_02.py --data-dir /tmp/cifar10-jpeg --out DIR [--epochs 3]

Runs, one after another in this process (each part alone on the GPU):
  imports    wall of `import torch` and `import deepspeed` in fresh interpreters;
  cprofile   02_cifar10/train_ds.py main() with ds_config_fast.json under cProfile, then the plain loop
             (benchmarks/plain_loop.py, same model, data path and batch) under cProfile;
  torch      the same two under torch.profiler (CPU + CUDA), tables by self CUDA and self CPU time.
Writes DIR/imports.txt, DIR/load.txt (load_imagefolder's wall) and DIR/<cprofile|torch>_<ds|plain>.txt.
cProfile's tottime of Tensor.__bool__ / .item / .tolist is time the
host spent waiting for the GPU; torch.profiler's CUDA totals say how busy the GPU was.
"""

import argparse
import cProfile
import io
import pstats
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_loop import REPO, load_example  # noqa: E402
from plain_loop import run as plain_run


def ds_args(a, out):
    return ["--dataset", "imagefolder", "--data-dir", a.data_dir, "--deepspeed_config",
            str(REPO / "02_cifar10" / "ds_config_fast.json"), "--epochs", str(a.epochs), "--label-smoothing", "0.1",
            "--tta-flip", "--output-dir", out]


def imports(out):
    code = ("import time; t = time.perf_counter(); import torch; a = time.perf_counter(); import deepspeed; "
            "b = time.perf_counter(); torch.zeros(1, device='cuda'); c = time.perf_counter(); "
            "print(f'import torch {a - t:.2f} s, import deepspeed {b - a:.2f} s, first CUDA op {c - b:.2f} s')")
    lines = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
             for _ in range(2)]
    (out / "imports.txt").write_text("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="/tmp/cifar10-jpeg")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=3)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    imports(out)

    ex02 = load_example("02_cifar10")
    t = time.perf_counter()
    train, test, _ = ex02.load_imagefolder(a.data_dir, print)
    (out / "load.txt").write_text(f"load_imagefolder: {time.perf_counter() - t:.2f} s\n")
    cfg = ex02.read_config(str(REPO / "02_cifar10" / "ds_config_fast.json"), 1)
    device = torch.device("cuda")

    def ds():
        ex02.main(ds_args(a, f"/tmp/profile_02_{time.time_ns()}"))

    def plain():
        rows = plain_run(ex02, train, test, cfg, device, a.epochs, label_smoothing=0.1)
        print(rows)

    for name, fn in (("ds", ds), ("plain", plain)):
        prof = cProfile.Profile()
        prof.enable()
        fn()
        prof.disable()
        s = io.StringIO()
        st = pstats.Stats(prof, stream=s)
        st.sort_stats("cumulative").print_stats(40)
        st.sort_stats("tottime").print_stats(40)
        (out / f"cprofile_{name}.txt").write_text(s.getvalue())

    from torch.profiler import ProfilerActivity, profile
    for name, fn in (("ds", ds), ("plain", plain)):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
        ka = prof.key_averages()
        (out / f"torch_{name}.txt").write_text(ka.table(sort_by="self_cuda_time_total", row_limit=30) + "\n"
                                               + ka.table(sort_by="self_cpu_time_total", row_limit=30) + "\n")


if __name__ == "__main__":
    main()
