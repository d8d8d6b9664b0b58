#!/usr/bin/env bash
# Session-4 GPU command A: where 02 fast's time goes (benchmarks/profile_02.py), and 01's per-epoch
# time under config variants (3 epochs each, results/gpu/01_variants.sh).
set -u
R=/tmp/r; mkdir -p $R/prof $R/var
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/hw.txt
T0=$(date +%s)
timeout 330 python3 benchmarks/profile_02.py --out $R/prof --epochs 3 > $R/prof/log.txt 2>&1
echo "profile rc=$? t=$(( $(date +%s) - T0 ))s" >> $R/status.txt
OUT=$R timeout 200 bash results/gpu/01_variants.sh >> $R/status.txt 2>&1
echo "variants rc=$? t=$(( $(date +%s) - T0 ))s" >> $R/status.txt
tar -czf $OUT/s4a.tgz -C $R .
cp $R/status.txt $OUT/
