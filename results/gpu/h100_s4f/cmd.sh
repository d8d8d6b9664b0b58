#!/usr/bin/env bash
# Session-4 GPU command F (results/gpu/h100_s4f/cmd.sh): 02's fast recipe twice more through bench.py, at
# commit 7f4cab9, with .pyc files kept as on a pip-installed box (after one warm-up import).
set -u
R=/tmp/r4f; mkdir -p $R
unset PYTHONDONTWRITEBYTECODE; export PYTHONPYCACHEPREFIX=/tmp/pyc4f
python3 -c 'import torch, torchvision.io, deepspeed, matplotlib.pyplot as plt; plt.figure(); plt.text(0, 0, "x"); plt.savefig("/tmp/w.png")' > /dev/null 2>&1
FA="--epochs 80 --label-smoothing 0.1 --tta-flip"
for i in 1 2; do
  python3 benchmarks/bench.py --out $R/b$i --only 02_fast --fast-args "$FA" --part-timeout 150 > $R/bench$i.log 2>&1
  echo "run $i rc=$?: $(grep -E '^\| 02 fast config (time|test)' $R/b$i/bench.md | cut -d'|' -f3 | tr '\n' ' ')" >> $R/status.txt
done
rm -rf $R/b*/runs/*/checkpoints $R/b*/runs/*/model.pt
tar -czf $OUT/s4f.tgz -C $R .
cp $R/status.txt $OUT/
