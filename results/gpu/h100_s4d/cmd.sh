#!/usr/bin/env bash
# Session-4 GPU command D (results/gpu/h100_s4d/cmd.sh): (1) 02 fast once more with .pyc files written
# (this machine sets PYTHONDONTWRITEBYTECODE=1, so every import compiles from source; a pip-installed box
# keeps .pyc files): a warm-up import, then the timed run. (2) The 2-core question: a plain PyTorch loop on
# 02's model at batch 32 (02's data path), on all cores and on 2, and 02 at its default config (batch 32)
# under cProfile on 2 cores.
set -u
R=/tmp/r4d; mkdir -p $R
T0=$(date +%s)
( unset PYTHONDONTWRITEBYTECODE; export PYTHONPYCACHEPREFIX=/tmp/pyc4d
  python3 -c 'import torch, torchvision.io, deepspeed, matplotlib.pyplot' > /dev/null 2>&1
  python3 -c 'import time; t = time.perf_counter(); import torch; a = time.perf_counter(); import deepspeed; b = time.perf_counter(); print(f"with .pyc: import torch {a - t:.2f} s, import deepspeed {b - a:.2f} s")' >> $R/status.txt 2>&1
  s=$(date +%s.%N)
  python3 02_cifar10/train_ds.py --dataset imagefolder --data-dir /tmp/cifar10-jpeg --deepspeed_config 02_cifar10/ds_config_fast.json \
    --epochs 80 --label-smoothing 0.1 --tta-flip --output-dir $R/02_fast_pyc > $R/02_fast_pyc.log 2>&1
  echo "02_fast_pyc rc=$? process wall $(python3 -c "import time; print(round(time.time() - $s, 1))") s" >> $R/status.txt )
echo "t=$(( $(date +%s) - T0 ))s" >> $R/status.txt
for cores in all 2; do
  pin=""; [ $cores = 2 ] && pin="taskset -c 0,1"
  $pin python3 - >> $R/status.txt 2>&1 <<PY
import json, statistics, sys, torch
sys.path.insert(0, "benchmarks")
import plain_loop
ex02 = plain_loop.load_example("02_cifar10")
train, test, _ = ex02.load_imagefolder("/tmp/cifar10-jpeg", lambda *a: None)
cfg = json.load(open("02_cifar10/ds_config.json"))
for check in (False, True):
    rows = plain_loop.run(ex02, train, test, cfg, torch.device("cuda"), 3, skip_check=check)
    ms = 1000 * statistics.median(r["epoch_s"] / r["steps"] for r in rows[1:])
    print(f"plain loop batch {cfg['train_micro_batch_size_per_gpu']}, cores $cores, skip_check {check}: {ms:.2f} ms/step")
PY
done
echo "t=$(( $(date +%s) - T0 ))s" >> $R/status.txt
taskset -c 0,1 python3 -m cProfile -o $R/p02_2c.prof 02_cifar10/train_ds.py --dataset imagefolder --data-dir /tmp/cifar10-jpeg \
  --deepspeed_config 02_cifar10/ds_config.json --epochs 1 --max-steps 1500 --output-dir $R/02_2c > $R/02_2c.log 2>&1
echo "02_2c rc=$? t=$(( $(date +%s) - T0 ))s" >> $R/status.txt
python3 -c "import pstats; s = pstats.Stats('$R/p02_2c.prof'); s.sort_stats('tottime').print_stats(35); s.sort_stats('cumulative').print_stats(50)" > $R/p02_2c.txt 2>&1
rm -rf $R/*/checkpoints $R/p02_2c.prof
tar -czf $OUT/s4d.tgz -C $R .
cp $R/status.txt $OUT/
