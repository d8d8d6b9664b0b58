#!/usr/bin/env bash
# Session-4 GPU command E (results/gpu/h100_s4e/cmd.sh): the seed-002 ratios again after the scripts clip
# with their own global norm (fp32 without ZeRO): 02 at batch 32 vs seed 002 as written, all cores and 2 cores.
set -u
R=/tmp/r4e; B=/tmp/bench4e; mkdir -p $R
T0=$(date +%s)
timeout 430 python3 benchmarks/bench.py --out $B --only 02_seed,seed,02_seed_2cpu,seed_2cpu --part-timeout 100 > $R/bench.log 2>&1
echo "bench rc=$? t=$(( $(date +%s) - T0 ))s" >> $R/status.txt
cp -r $B $R/bench; rm -rf $R/bench/runs/*/checkpoints
tar -czf $OUT/s4e.tgz -C $R .
cp $R/status.txt $OUT/
