"""Where the time goes, on a GPU: the examples launched as users launch them, and their training step
beside a bare DeepSpeed loop and plain PyTorch doing the same work.

  python3 benchmarks/speed.py launch --out OUT --runs 3 -- 02_cifar10 --dataset imagefolder \
      --data-dir /tmp/cifar10-jpeg --deepspeed_config 02_cifar10/ds_config_fast.json --epochs 50 ...
  python3 benchmarks/speed.py step --out OUT --example 02_cifar10 --data-dir /tmp/cifar10-jpeg \
      --config 02_cifar10/ds_config_fast.json [--compile]

launch: one warm-up run, then --runs runs of `deepspeed --num_gpus=1 <example>/train_ds.py ARGS`,
each line of output time-stamped as it arrives. Phases (seconds from the launcher's start): the
worker's start (the launcher's "spawned" line), its data loading (the script's "Loading" line), the
engine ready (its banner), the first epoch's end, the last report ("Training finished"), the exit.
Writes OUT/launch.json (every run, the median and the worst) and OUT/<example>_<k>.log.

step: in one process on one GPU, per optimizer step over whole epochs of the example's own data
path: (1) the script's train_one_epoch, (2) a bare DeepSpeed loop (forward, backward, step; no
checks or metrics), (3) plain PyTorch with the same model, data, loss and optimizer, (4) the GPU's
busy time per step of (1) (the sum of its kernels, torch.profiler). --compile adds (1) after
engine.compile(). Writes OUT/step_<example>.json.
"""

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = {"worker_start": "spawned with command", "data": "Loading    :", "engine_ready": "DeepSpeed CNN training",
          "first_epoch": "epoch   1/", "report": "Training finished"}


# ============================================================================ launch
def one_launch(example, args, log):
    cmd = ["deepspeed", "--num_gpus=1", str(REPO / example / "train_ds.py"), *args]
    start, stamps, lines = time.perf_counter(), {}, []
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        t = time.perf_counter() - start
        lines.append(f"{t:8.3f}  {line}")
        for name, marker in PHASES.items():
            if name not in stamps and marker in line:
                stamps[name] = round(t, 3)
    p.wait()
    stamps["exit"] = round(time.perf_counter() - start, 3)
    Path(log).write_text("".join(lines))
    return p.returncode, stamps


def launch(a, rest):
    example, args = rest[0], rest[1:]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for k in range(a.runs + 1):  # run 0 warms the caches (bytecode, the decoded-image files)
        run_dir = out / f"run{k}"
        rc, stamps = one_launch(example, [*args, "--output-dir", str(run_dir), "--overwrite"],
                                out / f"{example}_{k}.log")
        m = json.loads((run_dir / "metrics.json").read_text()) if rc == 0 else {"final": {}}
        runs.append({"run": k, "warm_up": k == 0, "rc": rc, "phases_s": stamps,
                     "test_accuracy": m["final"].get("test_accuracy"),
                     "script_wall_s": m["final"].get("wall_time_s"),
                     "epochs": m["final"].get("epochs_completed")})
        print(json.dumps(runs[-1]), flush=True)
    timed = [r for r in runs if not r["warm_up"] and r["rc"] == 0]
    walls = sorted(r["phases_s"]["exit"] for r in timed)
    doc = {"command": f"deepspeed --num_gpus=1 {example}/train_ds.py {' '.join(args)}", "runs": runs,
           "median_exit_s": statistics.median(walls) if walls else None, "worst_exit_s": walls[-1] if walls else None,
           "accuracies": [r["test_accuracy"] for r in timed], **machine()}
    (out / "launch.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps({k: doc[k] for k in ("median_exit_s", "worst_exit_s", "accuracies")}))


# ============================================================================ step
def load_example(example, script=None):
    spec = importlib.util.spec_from_file_location("train_ds", script or REPO / example / "train_ds.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_ds"] = mod
    spec.loader.exec_module(mod)
    return mod


def timed_epochs(fn, epochs, sync):
    times = []
    for e in range(epochs):
        sync()
        t = time.perf_counter()
        fn(e)
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:] or times)  # the first epoch warms up kernels and caches


def step(a):
    import deepspeed
    import torch
    import torch.nn.functional as F

    ex = load_example(a.example, a.script)
    rank, world, device = ex.setup_distributed()
    flags = ["--deepspeed_config", a.config, "--dataset", a.dataset, "--data-dir", a.data_dir,
             "--epochs", "10", "--log-interval", "1000000", *shlex.split(a.flags)]
    args = ex.parse_args(flags)
    cfg, dtype, own_clip = ex.load_config(args, 1, device.type == "cpu")
    data = ex.load_data(args, cfg, dtype, rank, world, device)
    steps = len(data.train) if hasattr(data.train, "__len__") else data.micro_batches
    ex.fill_schedule(cfg, args, steps)
    model_class = {"01_basic_convnet": "CNNModelEnhanced", "02_cifar10": "CIFAR10CNNEnhanced",
                   "03_cifar10_basic": "Net"}[a.example]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = getattr(ex, model_class)(len(data.classes))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    if a.compile:
        engine.compile()
    if a.variant == "no-sync":  # one rank: backward without DeepSpeed's gradient all-reduce
        backward = engine.backward

        def no_sync_backward(loss):
            with engine.no_sync():
                backward(loss)
        engine.backward = no_sync_backward
    if a.variant == "no-check":  # what the per-step isfinite read costs (measurement only)
        ex.torch.isfinite = lambda t: ex.torch.ones((), dtype=ex.torch.bool)
    run = ex.RunState()

    def script_epoch(e):
        run.epoch = e
        ex.train_one_epoch(engine, data, run, args, own_clip)

    result = {"example": a.example, "script": a.script, "config": a.config, "steps_per_epoch": steps, "dtype": dtype,
              "compiled": a.compile, "variant": a.variant, **machine()}
    result["script_ms"] = 1000 * timed_epochs(script_epoch, a.epochs, sync) / steps
    smoothing = getattr(args, "label_smoothing", 0.0)

    def bare_epoch(e):
        for x, y in ex.train_batches(data, e):
            engine.backward(F.cross_entropy(engine(x).float(), y, label_smoothing=smoothing))
            engine.step()

    result["bare_deepspeed_ms"] = 1000 * timed_epochs(bare_epoch, a.epochs, sync) / steps
    plain = getattr(ex, model_class)(len(data.classes)).to(device)
    params = {k: v for k, v in cfg["optimizer"]["params"].items() if k not in ("torch_adam", "adam_w_mode")}
    kind = cfg["optimizer"]["type"]
    opt = (torch.optim.Adam if kind == "Adam" else getattr(torch.optim, kind))(plain.parameters(), **params)
    amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype)

    def plain_epoch(e):
        for x, y in ex.train_batches(data, e):
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = F.cross_entropy(plain(x.float()).float(), y, label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    result["plain_pytorch_ms"] = 1000 * timed_epochs(plain_epoch, a.epochs, sync) / steps
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            script_epoch(a.epochs)
            sync()
        busy = sum(e.self_device_time_total for e in prof.key_averages())  # microseconds
        result["gpu_busy_ms"] = busy / 1000 / steps
        result["script_over_gpu_busy"] = result["script_ms"] / result["gpu_busy_ms"]
        if a.profile:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                script_epoch(a.epochs + 1)
                sync()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.profile))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tail = f"_{Path(a.script).parent.name}" if a.script else ""
    name = f"step_{a.example}{tail}{'_compiled' if a.compile else ''}_{a.variant}.json"
    (out / name).write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)


def machine():
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "cpus": os.cpu_count(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


def main():
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    lp = sub.add_parser("launch")
    lp.add_argument("--out", required=True)
    lp.add_argument("--runs", type=int, default=3)
    sp = sub.add_parser("step")
    sp.add_argument("--out", required=True)
    sp.add_argument("--example", default="02_cifar10")
    sp.add_argument("--config", default=str(REPO / "02_cifar10" / "ds_config_fast.json"))
    sp.add_argument("--dataset", default="imagefolder")
    sp.add_argument("--data-dir", default="/tmp/cifar10-jpeg")
    sp.add_argument("--epochs", type=int, default=4, help="timed epochs per loop (the first is warm-up)")
    sp.add_argument("--script", help="a variant of the example's train_ds.py to time instead")
    sp.add_argument("--compile", action="store_true", help="time the script's step after engine.compile()")
    sp.add_argument("--variant", choices=["none", "no-sync", "no-check"], default="none",
                    help="no-sync: backward without the all-reduce (one rank); no-check: without the "
                         "per-step isfinite read, to measure its cost")
    sp.add_argument("--profile", type=int, default=0, help="print the N costliest ops (CPU time)")
    sp.add_argument("--flags", default="", help='more train_ds.py flags, e.g. "--label-smoothing 0.1"')
    a = p.parse_args(own)
    launch(a, rest) if a.what == "launch" else step(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
