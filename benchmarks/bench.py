"""Side-by-side speed benchmark of the examples, seed 002's pipeline as written, and a plain PyTorch loop.

What it measures, on one device and the same data, in one run:
  01, 02_fast, 02_seed, 03, 03_fp16, 03_zero2   each example's real train_ds.py at a shipped config, run as a
      subprocess (`python <example>/train_ds.py ...`, no launcher needed) on CIFAR-10 JPEGs (01: its own
      synthetic digits). Read from its metrics.json: seconds per epoch, images/s, step time, test accuracy;
      measured from outside: process wall and "time to the final report" (launch -> the script's
      "Training finished" line), peak GPU memory (nvidia-smi polled every 0.5 s).
  02_seed_2cpu    02 at the seed's batch 32, pinned to 2 CPU cores (sched_setaffinity, OMP_NUM_THREADS=2).
  seed, seed_2cpu seed 002's pipeline as written (benchmarks/seed002_pipeline.py: DataLoader with 2 workers,
      PIL transforms, per-parameter .item() grad-norm loop, per-step .item() logging) through a DeepSpeed
      engine, in this process; --seed-steps steps after a short warm-up, extrapolated to a full epoch
      (the output says so). seed_2cpu pins the whole process and its workers to 2 cores.
  plain           a plain PyTorch loop (no DeepSpeed) on 02's model, 02's on-device data + augmentation path
      (imported from 02_cifar10/train_ds.py) and 02's fast config (batch 512); step time = epoch time / steps,
      as for 02 (both include the per-epoch test pass, with test-time flip when --fast-args has --tta-flip).
  plain_check     the same plus 02's own non-finite check (global grad norm, one host read per step), to
      show what that check costs apart from DeepSpeed.
Ratios and absolute targets are then judged PASS/MISS (see TARGETS). --cpu runs a small version with no
GPU: the examples' --max-steps 50 smokes on synthetic data, plus tiny seed/plain runs on random tensors.

  python3 benchmarks/bench.py --out /tmp/bench                               # whole GPU suite, ~7-8 min
  python3 benchmarks/bench.py --out /tmp/bench --only 02_fast,02_seed,seed,plain
  python3 benchmarks/bench.py --out /tmp/bench --only 01,03 --append         # add parts to an earlier run
  python3 benchmarks/bench.py --out all --merge a/bench.json b/bench.json     # join finished runs, run nothing
  uv run python benchmarks/bench.py --cpu --out /tmp/bench_cpu               # CPU, ~2-4 min on 2 cores
Writes OUT/bench.json, OUT/bench.md, OUT/logs/<part>.log and OUT/runs/<part>/ (the examples' outputs).
"""

import argparse
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CIFAR_TRAIN = 50_000  # images in a full CIFAR-10 training epoch (for extrapolating --max-steps runs)
STEP_LINE = re.compile(r"\|\s*([\d,]+) img/s\s*$")  # the examples' per-interval step lines end like this

# ============================================================================ parts and targets
GPU_PARTS = ["01", "03", "03_fp16", "03_zero2", "02_fast", "02_seed", "02_seed_2cpu", "seed", "seed_2cpu", "plain",
             "plain_check"]
CPU_PARTS = ["smoke_01", "smoke_02", "smoke_03", "seed", "plain"]
IN_PROCESS = {"seed", "seed_2cpu", "plain", "plain_check"}

# (key, what, value: part.field or (numerator, denominator), comparison, goal, unit, mode)
TARGETS = [
    ("seed_ratio", "02 at batch 32 epoch time / seed 002 as written epoch time", ("02_seed.epoch_s", "seed.epoch_s"),
     "<=", 0.75, "", "gpu"),
    ("seed_ratio_2cpu", "same, both limited to 2 CPU cores", ("02_seed_2cpu.epoch_s", "seed_2cpu.epoch_s"),
     "<=", 0.4, "", "gpu"),
    ("fast_vs_plain", "02 fast config step time / plain PyTorch step time", ("02_fast.step_ms", "plain.step_ms"),
     "<=", 1.15, "", "gpu"),
    ("fast_accuracy", "02 fast config test accuracy", "02_fast.test_accuracy", ">=", 80.0, "%", "gpu"),
    ("fast_wall", "02 fast config time to final report", "02_fast.report_s", "<=", 60.0, "s", "gpu"),
    ("01_wall", "01 default config, 50 epochs, time to final report", "01.report_s", "<=", 30.0, "s", "gpu"),
    ("smoke_01_wall", "01 --max-steps 50 smoke, process wall", "smoke_01.wall_s", "<=", 60.0, "s", "cpu"),
    ("smoke_02_wall", "02 --max-steps 50 smoke, process wall", "smoke_02.wall_s", "<=", 60.0, "s", "cpu"),
    ("smoke_03_wall", "03 --max-steps 50 smoke, process wall", "smoke_03.wall_s", "<=", 60.0, "s", "cpu"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder: bench.json, bench.md, logs/, runs/")
    p.add_argument("--cpu", action="store_true", help="small CPU version (no CUDA): smokes + tiny seed/plain runs")
    p.add_argument("--only", default="", help=f"comma-separated parts, empty for all of the mode's; GPU: "
                                              f"{','.join(GPU_PARTS)}; CPU: {','.join(CPU_PARTS)}")
    p.add_argument("--append", action="store_true", help="keep the parts already in OUT/bench.json")
    p.add_argument("--merge", nargs="+", metavar="BENCH_JSON", default=[],
                   help="run nothing: join these bench.json files (later ones win per part) into OUT")
    p.add_argument("--data-dir", default="/tmp/cifar10-jpeg", help="CIFAR-10 JPEGs: DIR/{train,test}/<class>/*.jpg")
    p.add_argument("--epochs-01", type=int, default=50, help="epochs of the 01 run (its target is for 50)")
    p.add_argument("--fast-args", default="--epochs 30 --label-smoothing 0.1",
                   help="flags of the 02 fast run besides --deepspeed_config ds_config_fast.json")
    p.add_argument("--seed-config-epochs", type=int, default=2,
                   help="epochs of the 02_seed runs; the last one is timed")
    p.add_argument("--steps-03", type=int, default=1000, help="--max-steps of each 03 run (batch 4)")
    p.add_argument("--seed-steps", type=int, default=500,
                   help="timed steps of the seed pipeline (0: a full epoch); extrapolated to an epoch")
    p.add_argument("--warmup-steps", type=int, default=30, help="untimed steps before the seed pipeline's timing")
    p.add_argument("--plain-epochs", type=int, default=5, help="epochs of the plain loop (the first is not timed)")
    p.add_argument("--part-timeout", type=int, default=300, help="seconds before a subprocess part is killed")
    args = p.parse_args(argv)
    modes = CPU_PARTS if args.cpu else GPU_PARTS
    args.parts = [s for s in args.only.split(",") if s] or ([] if args.merge else list(modes))
    unknown = [s for s in args.parts if s not in modes]
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)} for {'--cpu' if args.cpu else 'GPU'} mode; "
                f"choose from {', '.join(modes)}")
    args.parts = [s for s in modes if s in args.parts]  # subprocess parts first, in-process ones last
    needs_data = not args.cpu and any(s != "01" for s in args.parts)
    if needs_data and not all(os.path.isdir(os.path.join(args.data_dir, d)) for d in ("train", "test")):
        p.error(f"--data-dir {args.data_dir} needs train/<class>/*.jpg and test/<class>/*.jpg (CIFAR-10 as JPEGs)")
    return args


# ============================================================================ measuring a subprocess
def nvidia_smi(*query):
    try:
        out = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line.strip()]


def device_used_mib():
    rows = nvidia_smi("--query-gpu=memory.used")
    try:
        return float(rows[0][0])
    except (IndexError, ValueError):  # no GPU, or "[N/A]"
        return None


class GpuMemory(threading.Thread):
    """Peak GPU memory of one process, polling nvidia-smi: the process's own used_memory when nvidia-smi
    lists it (some containers hide PIDs), else the device's memory.used minus its level before launch."""

    def __init__(self, interval=0.5):
        super().__init__(daemon=True)
        self.interval, self.pid, self.done = interval, None, threading.Event()
        self.base, self.proc_peak, self.dev_peak = device_used_mib(), None, None

    def watch(self, pid):
        self.pid = pid
        self.start()

    def run(self):
        while not self.done.wait(self.interval):
            for row in nvidia_smi("--query-compute-apps=pid,used_memory"):
                if len(row) == 2 and row[0] == str(self.pid) and row[1].replace(".", "").isdigit():
                    self.proc_peak = max(self.proc_peak or 0.0, float(row[1]))
            used = device_used_mib()
            if used is not None:
                self.dev_peak = max(self.dev_peak or 0.0, used)

    def result(self):
        self.done.set()
        if self.is_alive():
            self.join()
        if self.proc_peak:
            return self.proc_peak, "nvidia-smi (process)"
        if self.dev_peak is not None and self.base is not None:
            return self.dev_peak - self.base, "nvidia-smi (device minus baseline)"
        return None, "unavailable"


def child_env(cpu, cores):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "WANDB_API_KEY"))}
    env["PYTHONUNBUFFERED"] = "1"
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    if cores:
        env["OMP_NUM_THREADS"] = str(len(cores))
    return env


def run_script(cmd, log_path, cpu, cores, timeout):
    """Run cmd, teeing output to log_path. Returns rc, process wall, setup time (launch -> the start banner:
    imports, data loading, engine), time to the final report (launch -> 'Training finished') and peak memory."""
    mem = None if cpu else GpuMemory()
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    t0, banner_s, report_s, step_ips = time.perf_counter(), None, None, []
    with open(log_path, "w") as log:
        log.write("+ " + shlex.join(cmd) + "\n")
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(cpu, cores), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, preexec_fn=pin)
        if mem:
            mem.watch(proc.pid)
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        for line in proc.stdout:
            log.write(line)
            if banner_s is None and "DeepSpeed CNN training" in line:  # printed once data and engine are ready
                banner_s = time.perf_counter() - t0
            rate = STEP_LINE.search(line)
            if rate and not line.startswith("epoch"):  # training-only throughput of one log interval
                step_ips.append(float(rate.group(1).replace(",", "")))
            if report_s is None and "Training finished" in line:
                report_s = time.perf_counter() - t0
        rc = proc.wait()
        killer.cancel()
    wall = time.perf_counter() - t0
    peak, how = mem.result() if mem else (None, "n/a (CPU)")
    return {"rc": rc, "wall_s": wall, "setup_s": banner_s, "report_s": report_s, "step_line_ips": step_ips,
            "peak_gpu_mib": peak, "peak_gpu_method": how, "timed_out": wall >= timeout}


def two_cores():
    return set(sorted(os.sched_getaffinity(0))[:2])


# ============================================================================ the examples' parts
def example_part(name, args):
    """(example folder, its flags, 2-core pinning?, images of a full epoch if the run is partial, what)."""
    data = ["--dataset", "imagefolder", "--data-dir", args.data_dir]
    seedcfg = ["--epochs", str(args.seed_config_epochs)]

    def ex03(config, label):  # a bounded run: batch 4 means 12,500 steps per epoch
        flags = data + ["--deepspeed_config", str(REPO / "03_cifar10_basic" / config), "--epochs", "1",
                        "--max-steps", str(args.steps_03), "--log-interval", str(max(1, args.steps_03 // 5))]
        return "03_cifar10_basic", flags, False, CIFAR_TRAIN, f"03 {config} ({label}), {args.steps_03} steps, extrapolated"

    def smoke(example, flags):
        return example, flags + ["--max-steps", "50"], False, None, f"{example} --max-steps 50, synthetic data"

    parts = {
        "01": lambda: ("01_basic_convnet", ["--epochs", str(args.epochs_01)], False, None,
                       f"01 ds_config.json (fp16 ZeRO-1, batch 32), synthetic digits, {args.epochs_01} epochs"),
        "02_fast": lambda: ("02_cifar10", data + ["--deepspeed_config", str(REPO / "02_cifar10/ds_config_fast.json"),
                                                  *shlex.split(args.fast_args)],
                            False, None, f"02 ds_config_fast.json (batch 512) {args.fast_args}"),
        "02_seed": lambda: ("02_cifar10", data + seedcfg, False, None,
                            f"02 ds_config.json (seed's batch 32), {args.seed_config_epochs} epochs, last one timed"),
        "02_seed_2cpu": lambda: ("02_cifar10", data + seedcfg, True, None, "same as 02_seed, pinned to 2 CPU cores"),
        "03": lambda: ex03("ds_config.json", "batch 4, fp32"),
        "03_fp16": lambda: ex03("ds_config_fp16.json", "fp16, ZeRO-1"),
        "03_zero2": lambda: ex03("ds_config_zero2.json", "fp32, ZeRO-2"),
        "smoke_01": lambda: smoke("01_basic_convnet", []),
        "smoke_02": lambda: smoke("02_cifar10", ["--dataset", "synthetic"]),
        "smoke_03": lambda: smoke("03_cifar10_basic", ["--dataset", "synthetic"]),
    }
    return parts[name]()


def from_metrics(m, full_epoch_images, step_ips):
    """Epoch time (the last epoch), images/s, step time, accuracy. A partial run (--max-steps) is extrapolated
    to a full epoch from its step lines' training-only images/s (median, first interval left out), so its
    test pass does not count 12 times over; without step lines, from metrics.json's images/s."""
    cfg, eps, final = m["config"], m["epochs"], m.get("final") or {}
    batch = cfg["train_micro_batch_size_per_gpu"] * cfg.get("gradient_accumulation_steps", 1) * m["world_size"]
    steady = eps[1:] or eps  # the first epoch carries one-off start-up costs
    last = eps[-1]
    out = {"epochs_run": len(eps), "batch": batch, "epoch_s": last["epoch_time_s"],
           "images_per_s": statistics.median(e["images_per_s"] for e in steady),
           "step_ms": 1000 * statistics.median(e["epoch_time_s"] / math.ceil(e["train_images"] / batch) for e in steady),
           "test_accuracy": final.get("test_accuracy", last.get("test_accuracy")),
           "script_wall_s": final.get("wall_time_s"), "extrapolated": False,
           **{f"script_{k}": v for k, v in final.items() if "mem" in k.lower()}}  # if a script reports memory
    if full_epoch_images and last["train_images"] < full_epoch_images:
        windows = step_ips[1:]
        ips = statistics.median(windows) if windows else last["images_per_s"]
        out.update(epoch_s=full_epoch_images / ips, images_per_s=ips, step_ms=1000 * batch / ips, extrapolated=True,
                   epoch_s_partial_incl_test=last["epoch_time_s"])
        out["note"] = (f"{last['train_images']:,} images trained; epoch = {full_epoch_images:,} / "
                       + (f"median images/s of {len(windows)} step-line intervals" if windows else
                          "metrics.json images/s (incl. the test pass)"))
    return out


def run_example_part(name, args, out):
    example, flags, pinned, full, what = example_part(name, args)
    run_dir = out / "runs" / name
    cmd = [sys.executable, str(REPO / example / "train_ds.py"), *flags, "--output-dir", str(run_dir)]
    cores = two_cores() if pinned else None
    res = run_script(cmd, out / "logs" / f"{name}.log", args.cpu, cores, args.part_timeout)
    res.update(what=what, command=shlex.join(cmd), cores=sorted(cores) if cores else None)
    if name == "01":
        res["epochs_requested"] = args.epochs_01
    try:
        res.update(from_metrics(json.loads((run_dir / "metrics.json").read_text()), full, res["step_line_ips"]))
    except (OSError, ValueError, KeyError, ZeroDivisionError, statistics.StatisticsError) as e:
        res["error"] = f"no usable metrics.json ({type(e).__name__}: {e})"
    if name.startswith("smoke"):
        res["note"] = "--max-steps 50: epoch s and images/s cover that partial epoch (and its test pass)"
    if res["rc"] != 0:
        res["error"] = f"exit code {res['rc']}{' (timed out)' if res['timed_out'] else ''}; see logs/{name}.log"
    return res


# ============================================================================ in-process parts
class InProcess:
    """Shared state of the in-process parts: torch.distributed (for the DeepSpeed engine), device, data."""

    def __init__(self, args):
        import torch

        self.args, self.torch = args, torch
        self.device = self._init_distributed()
        self._data = None

    def _init_distributed(self):
        import socket

        import deepspeed
        from deepspeed.accelerator import get_accelerator

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(port)).items():
            os.environ.setdefault(k, v)
        accel = get_accelerator()
        if accel.device_name() != "cpu":
            accel.set_device(0)
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name())
        return self.torch.device("cpu") if accel.device_name() == "cpu" else self.torch.device("cuda", 0)

    def data(self):
        """((train HWC uint8, labels), (test HWC uint8, labels)) numpy: the JPEGs, or tiny random ones on CPU."""
        import seed002_pipeline as sp

        if self._data is None:
            if self.args.cpu:
                self._data = sp.synthetic_split(256, 1), sp.synthetic_split(128, 2)
            else:
                t0 = time.perf_counter()
                self._data = tuple(sp.load_jpeg_split(self.args.data_dir, split) for split in ("train", "test"))
                print(f"  loaded {len(self._data[0][1]):,} + {len(self._data[1][1]):,} JPEGs in "
                      f"{time.perf_counter() - t0:.1f}s", flush=True)
        return self._data

    def reset_peak(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self):
        if self.device.type != "cuda":
            return {"peak_gpu_mib": None, "peak_gpu_method": "n/a (CPU)"}
        self.torch.cuda.synchronize()
        return {"peak_gpu_mib": self.torch.cuda.max_memory_allocated() / 2**20,
                "peak_gpu_method": "torch max_memory_allocated"}


@contextmanager
def pinned(cores, torch):
    """Pin every thread of this process (and so the DataLoader workers it starts) to `cores`."""
    if not cores:
        yield
        return
    before, threads = os.sched_getaffinity(0), torch.get_num_threads()
    tids = [int(t) for t in os.listdir("/proc/self/task")]
    for tid in tids:
        os.sched_setaffinity(tid, cores)
    torch.set_num_threads(len(cores))
    try:
        yield
    finally:
        for tid in tids:
            try:
                os.sched_setaffinity(tid, before)
            except OSError:  # a thread that ended meanwhile
                pass
        torch.set_num_threads(threads)


def run_seed_part(name, ctx):
    import seed002_pipeline as sp

    args = ctx.args
    (x, y), _ = ctx.data()
    cores = two_cores() if name == "seed_2cpu" else None
    steps = sp.steps_per_epoch(len(y))
    timed = args.seed_steps if args.seed_steps and args.seed_steps < steps else 0
    lines = []
    ctx.reset_peak()
    t0 = time.perf_counter()
    with pinned(cores, ctx.torch):
        engine = sp.make_engine()
        loader = sp.train_loader(x, y)
        sp.run_epoch(engine, loader, ctx.device, epoch=0, max_steps=args.warmup_steps)  # cuDNN, allocator: untimed
        timing = sp.run_epoch(engine, loader, ctx.device, epoch=1, max_steps=timed, log=lines.append)
    epoch_s, extrapolated = sp.epoch_estimate(timing, steps)
    res = {"what": "seed 002 as written: DataLoader(2 workers, PIL), batch 32, .item() per step, DeepSpeed fp32"
                   + (", pinned to 2 CPU cores" if cores else ""),
           "command": "in-process (benchmarks/seed002_pipeline.py)", "cores": sorted(cores) if cores else None,
           "rc": 0, "wall_s": time.perf_counter() - t0, "batch": 32, "epoch_s": epoch_s,
           "images_per_s": len(y) / epoch_s, "step_ms": 1000 * epoch_s / steps, "extrapolated": extrapolated,
           "train_accuracy": timing["train_accuracy"], "timed_steps": timing["steps"], "steps_per_epoch": steps,
           **ctx.peak()}
    if extrapolated:
        res["note"] = (f"{timing['steps']} of {steps} steps timed after {args.warmup_steps} warm-up steps; epoch = "
                       f"first step ({timing['first_step_s']:.2f}s, worker start) + per-step x remaining steps")
    return res


def run_plain_part(name, ctx):
    import plain_loop

    args = ctx.args
    (x, y), (tx, ty) = ctx.data()
    torch = ctx.torch
    train = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y)
    test = torch.from_numpy(tx).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(ty)
    cfg = json.loads((REPO / "02_cifar10/ds_config_fast.json").read_text())
    fast = shlex.split(args.fast_args)
    smoothing = float(fast[fast.index("--label-smoothing") + 1]) if "--label-smoothing" in fast else 0.0
    if args.cpu:  # tiny data: a small batch so that there are several steps
        cfg["train_micro_batch_size_per_gpu"] = 32
    ex02 = plain_loop.load_example("02_cifar10")
    check = name == "plain_check"
    ctx.reset_peak()
    t0 = time.perf_counter()
    rows = plain_loop.run(ex02, train, test, cfg, ctx.device, epochs=args.plain_epochs, label_smoothing=smoothing,
                          tta_flip="--tta-flip" in fast, skip_check=check)
    steady = rows[1:] or rows
    return {"what": f"plain PyTorch loop, 02's model + on-device data path, ds_config_fast.json settings "
                    f"(batch {cfg['train_micro_batch_size_per_gpu']}), {len(rows)} epochs"
                    + (", plus 02's per-step non-finite check (grad norm, one host read)" if check else ""),
            "command": "in-process (benchmarks/plain_loop.py)", "rc": 0, "wall_s": time.perf_counter() - t0,
            "batch": cfg["train_micro_batch_size_per_gpu"], "epochs_run": len(rows),
            "epoch_s": statistics.median(r["epoch_s"] for r in steady),
            "images_per_s": statistics.median(len(y) / r["epoch_s"] for r in steady),
            "step_ms": 1000 * statistics.median(r["epoch_s"] / r["steps"] for r in steady),
            "train_step_ms": 1000 * statistics.median(r["train_s"] / r["steps"] for r in steady),
            "test_accuracy": rows[-1]["test_accuracy"], "extrapolated": False,
            "note": "step time = epoch time (incl. test pass) / steps, median of epochs 2+", **ctx.peak()}


# ============================================================================ report
def hardware(cpu):
    import deepspeed
    import torch
    import torchvision

    gpu = None if cpu else nvidia_smi("--query-gpu=name,memory.total,driver_version")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    return {"gpu": ", ".join(gpu[0]) + " (name, MiB, driver)" if gpu else
            "none (CPU mode)" if cpu else "not found by nvidia-smi",
            "torch": torch.__version__, "deepspeed": deepspeed.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)), "platform": platform.platform(),
            "git_commit": commit.strip(), "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")}


def field(parts, ref):
    part, key = ref.split(".")
    value = parts.get(part, {}).get(key)
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def judge(parts, cpu):
    rows = []
    for key, what, ref, op, goal, unit, mode in TARGETS:
        if mode != ("cpu" if cpu else "gpu"):
            continue
        if isinstance(ref, tuple):
            num, den = field(parts, ref[0]), field(parts, ref[1])
            value = num / den if num is not None and den else None
        else:
            value = field(parts, ref)
        status = "n/a" if value is None else "PASS" if (value <= goal if op == "<=" else value >= goal) else "MISS"
        asked = parts.get("01", {}).get("epochs_requested")
        if key == "01_wall" and value is not None and asked != 50:  # an early stop still counts as the 50-epoch run
            status = f"n/a (--epochs-01 {asked})"
        rows.append({"key": key, "what": what, "value": value, "goal": f"{op} {goal:g}{unit}", "unit": unit,
                     "status": status, "from": ref if isinstance(ref, str) else " / ".join(ref)})
    return rows


def fmt(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:,.{digits}f}" if isinstance(v, float) else str(v)


def markdown(doc):
    hw = doc["hardware"]
    out = [f"# Benchmark ({'CPU' if doc['cpu_mode'] else 'GPU'} mode)", "",
           f"- hardware: GPU {hw['gpu']}; {hw['cpu_count']} CPUs ({hw['cpus_usable']} usable); {hw['platform']}",
           f"- software: torch {hw['torch']}, torchvision {hw['torchvision']}, deepspeed {hw['deepspeed']}, "
           f"python {hw['python']}; repo commit {hw['git_commit']}; {hw['date_utc']} UTC",
           *[f"- command: `{c}`" for c in doc["commands"]], "", "## Targets", "",
           "| target | value | goal | status | from |", "|---|---|---|---|---|"]
    for t in doc["targets"]:
        value = "-" if t["value"] is None else f"{fmt(t['value'], 3)}{t['unit']}"
        out.append(f"| {t['what']} | {value} | {t['goal']} | {t['status']} | {t['from']} |")
    out += ["", "## Parts", "", "| part | what | epoch s | images/s | step ms | test acc % | time to report s "
            "| process wall s | setup s | peak GPU MiB | notes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in doc["parts"].items():
        notes = "; ".join(filter(None, [("extrapolated: " + p.get("note", "")) if p.get("extrapolated") else
                                        p.get("note"), p.get("error"), p.get("peak_gpu_method")]))
        out.append(f"| {name} | {p.get('what', '')} | {fmt(p.get('epoch_s'))} | {fmt(p.get('images_per_s'), 0)} "
                   f"| {fmt(p.get('step_ms'), 3)} | {fmt(p.get('test_accuracy'))} | {fmt(p.get('report_s'), 1)} "
                   f"| {fmt(p.get('wall_s'), 1)} | {fmt(p.get('setup_s'), 1)} | {fmt(p.get('peak_gpu_mib'), 0)} | {notes} |")
    out += ["", "Epoch s: the last epoch from metrics.json (includes the test pass) for the examples; marked "
            "rows are extrapolated from a partial epoch. Time to report: launch -> the \"Training finished\" line; "
            "setup: launch -> the start banner (imports, data loading, engine). "
            "Peak GPU memory: nvidia-smi for subprocesses (includes the CUDA context), torch's "
            "max_memory_allocated for in-process parts. Commands of each part are in bench.json.", ""]
    return "\n".join(out)


def run_part(name, args, out, ctx):
    """One part; an exception in an in-process part is recorded as its error, not the end of the run."""
    if name not in IN_PROCESS:
        return run_example_part(name, args, out), ctx
    try:
        ctx = ctx or InProcess(args)
        return (run_seed_part if name.startswith("seed") else run_plain_part)(name, ctx), ctx
    except Exception as e:  # noqa: BLE001 - keep the other parts' results
        traceback.print_exc()
        return {"rc": 1, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}, ctx


def write_report(out, args, old, parts, hw):
    """bench.json and bench.md, rewritten after every part so that a killed run still leaves its results."""
    order = CPU_PARTS if args.cpu else GPU_PARTS
    parts = {k: parts[k] for k in order if k in parts}
    doc = {"cpu_mode": args.cpu, "hardware": hw,
           "commands": old.get("commands", []) + ([] if args.merge else [shlex.join([sys.executable, *sys.argv])]),
           "parts": parts, "targets": judge(parts, args.cpu)}
    (out / "bench.json").write_text(json.dumps(doc, indent=2))
    (out / "bench.md").write_text(markdown(doc))
    return doc


def main(argv=None):
    args = parse_args(argv)
    if args.cpu:  # before torch is imported anywhere
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    sys.path.insert(0, str(HERE))
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    old = json.loads((out / "bench.json").read_text()) if args.append and (out / "bench.json").exists() else {}
    for path in args.merge:  # e.g. two GPU commands whose outputs came back to separate folders
        doc = json.loads(Path(path).read_text())
        old = {"commands": old.get("commands", []) + doc["commands"], "parts": {**old.get("parts", {}), **doc["parts"]},
               "hardware": doc["hardware"]}
    parts, ctx = dict(old.get("parts", {})), None
    hw = old["hardware"] if args.merge else hardware(args.cpu)
    for name in args.parts:
        print(f"[bench] {name} ...", flush=True)
        t0 = time.perf_counter()
        parts[name], ctx = run_part(name, args, out, ctx)
        p = parts[name]
        print(f"[bench] {name}: {time.perf_counter() - t0:.1f}s | epoch {fmt(p.get('epoch_s'))}s | step "
              f"{fmt(p.get('step_ms'), 3)} ms | acc {fmt(p.get('test_accuracy'))} {p.get('error', '')}", flush=True)
        write_report(out, args, old, parts, hw)
    print(markdown(write_report(out, args, old, parts, hw)))
    return 0 if all("error" not in p for p in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
