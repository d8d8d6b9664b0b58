"""Choose 02's fast recipe on held-out training images, never on the test set: each candidate trains
with --val-split 5000 and is judged by its validation accuracy at the last epoch. Candidates run
side by side on one GPU (these small steps leave it mostly idle), so their wall times say nothing.

  python3 benchmarks/recipe_sweep.py --out OUT --data-dir /tmp/cifar10-jpeg [--only a,b]

Writes OUT/sweep.json (one row per candidate: its changes, validation and test accuracy) and each
candidate's console and metrics.json under OUT/<name>/.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = ["--deepspeed_config", str(REPO / "02_cifar10" / "ds_config_fast.json"), "--label-smoothing", "0.1",
        "--tta-flip", "--val-split", "5000"]
# name: (flags, changes to ds_config_fast.json)
CANDIDATES = {
    "e40_w5": (["--epochs", "40", "--warmup-epochs", "5"], {}),
    "e40_w2": (["--epochs", "40", "--warmup-epochs", "2"], {}),
    "e40_w2_lr04": (["--epochs", "40", "--warmup-epochs", "2"], {"lr": 0.4}),
    "e40_w2_lr01": (["--epochs", "40", "--warmup-epochs", "2"], {"lr": 0.1}),
    "e40_w2_wd1e3": (["--epochs", "40", "--warmup-epochs", "2"], {"weight_decay": 0.001}),
    "e40_w2_b1024_lr04": (["--epochs", "40", "--warmup-epochs", "2"], {"lr": 0.4, "micro": 1024}),
    "e35_w2": (["--epochs", "35", "--warmup-epochs", "2"], {}),
    "e50_w2": (["--epochs", "50", "--warmup-epochs", "2"], {}),
}


def config(out, name, changes):
    cfg = json.loads((REPO / "02_cifar10" / "ds_config_fast.json").read_text())
    cfg["optimizer"]["params"].update({k: v for k, v in changes.items() if k != "micro"})
    if "micro" in changes:
        cfg["train_micro_batch_size_per_gpu"] = changes["micro"]
    path = out / f"{name}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir", default="/tmp/cifar10-jpeg")
    p.add_argument("--only", default="", help="comma-separated candidate names (default: all)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in CANDIDATES if not a.only or n in a.only.split(",")]
    procs = {}
    for name in names:
        flags, changes = CANDIDATES[name]
        cmd = [sys.executable, str(REPO / "02_cifar10" / "train_ds.py"), "--dataset", "imagefolder",
               "--data-dir", a.data_dir, *BASE, *flags, "--deepspeed_config", str(config(out, name, changes)),
               "--output-dir", str(out / name), "--log-interval", "100000"]
        log = open(out / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO), cmd)
        time.sleep(2)  # the first one writes the decoded-image file the others then read
    rows = []
    for name, (proc, cmd) in procs.items():
        proc.wait()
        m = json.loads((out / name / "metrics.json").read_text()) if proc.returncode == 0 else None
        last = m["epochs"][-1] if m else {}
        rows.append({"name": name, "rc": proc.returncode, "flags": CANDIDATES[name][0],
                     "config_changes": CANDIDATES[name][1], "val_accuracy": last.get("val_accuracy"),
                     "test_accuracy": last.get("test_accuracy"), "command": " ".join(cmd[1:])})
        print(json.dumps({k: rows[-1][k] for k in ("name", "rc", "val_accuracy", "test_accuracy")}), flush=True)
    (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
