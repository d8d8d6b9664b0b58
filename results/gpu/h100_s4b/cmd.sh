#!/usr/bin/env bash
# Session-4 GPU command B (results/gpu/h100_s4b/cmd.sh): warm caches like an installed box, then the
# new ImageFolder loader's time, the benchmark's 02 fast vs plain (and plain + 02's non-finite check),
# and 02 fast with fused SGD.
set -u
R=/tmp/r; B=/tmp/bench; mkdir -p $R
export PYTHONPYCACHEPREFIX=/tmp/pyc  # this machine's site-packages keep no .pyc; pip-installed ones do
T0=$(date +%s)
{ ls -ld /opt/torch/.venv/lib/python3.12/site-packages/torch/__pycache__ 2>&1; env | grep -i PYTHON; } > $R/env.txt
python3 -c 'import torch, torchvision.io, deepspeed, matplotlib.pyplot as plt; plt.figure(); plt.savefig("/tmp/warm.png")' > /dev/null 2>&1
echo "warm t=$(( $(date +%s) - T0 ))s" >> $R/status.txt
python3 -c 'import time; t = time.perf_counter(); import torch; a = time.perf_counter(); import deepspeed; b = time.perf_counter(); print(f"import torch {a - t:.2f} s, import deepspeed {b - a:.2f} s")' >> $R/status.txt 2>/dev/null
python3 - >> $R/status.txt 2>&1 <<'PY'
import sys, time; sys.path.insert(0, "benchmarks")
from plain_loop import load_example
m = load_example("02_cifar10"); t = time.perf_counter()
m.load_imagefolder("/tmp/cifar10-jpeg", lambda *a: None)
print(f"load_imagefolder {time.perf_counter() - t:.2f} s")
PY
FA="--epochs 80 --label-smoothing 0.1 --tta-flip"
python3 benchmarks/bench.py --out $B --only 02_fast,plain,plain_check --fast-args "$FA" --part-timeout 150 > $R/bench.log 2>&1
echo "bench rc=$? t=$(( $(date +%s) - T0 ))s" >> $R/status.txt
python3 -c 'import json; c = json.load(open("02_cifar10/ds_config_fast.json")); c["optimizer"]["params"]["fused"] = True; json.dump(c, open("/tmp/fast_fused.json", "w"))'
s=$(date +%s); python3 02_cifar10/train_ds.py --dataset imagefolder --data-dir /tmp/cifar10-jpeg --deepspeed_config /tmp/fast_fused.json \
  $FA --output-dir $R/02_fast_fused > $R/02_fast_fused.log 2>&1
echo "02_fast_fused rc=$? wall=$(( $(date +%s) - s ))s t=$(( $(date +%s) - T0 ))s" >> $R/status.txt
cp -r $B $R/bench; rm -rf $R/bench/runs/*/checkpoints $R/02_fast_fused/checkpoints
tar -czf $OUT/s4b.tgz -C $R .
cp $R/status.txt $OUT/
