#!/usr/bin/env bash
# Session-3 GPU command 3 (run from a snapshot of HEAD), each part alone on the GPU, one after another:
# the plain-PyTorch floor for 01, 02's fast recipe and the plain loop, the seed-vs-02 ratios, then
# 03's default 2-epoch run (the seed's command) for its wall time.
set -u
B=/tmp/bench; R=/tmp/runs; mkdir -p $R
FA="--epochs 80 --label-smoothing 0.1 --tta-flip"
T0=$(date +%s)
for dt in fp32 fp16; do timeout 60 python3 benchmarks/plain_01.py --epochs 6 --dtype $dt >> $R/plain_01.jsonl 2>> $R/plain_01.err; done
echo "plain_01 t=$(( $(date +%s) - T0 ))s" >> $R/status.txt
python3 benchmarks/bench.py --out $B --only 02_fast,plain --fast-args "$FA" --part-timeout 150 > $R/bench_a.log 2>&1
echo "bench A rc=$? t=$(( $(date +%s) - T0 ))s" >> $R/status.txt
python3 benchmarks/bench.py --out $B --only 02_seed,02_seed_2cpu,seed,seed_2cpu --append --fast-args "$FA" --part-timeout 100 > $R/bench_b.log 2>&1
echo "bench B rc=$? t=$(( $(date +%s) - T0 ))s" >> $R/status.txt
s=$(date +%s); timeout $(( 470 - s + T0 )) python3 03_cifar10_basic/train_ds.py --deepspeed --deepspeed_config 03_cifar10_basic/ds_config.json \
    --dataset imagefolder --data-dir /tmp/cifar10-jpeg --output-dir $R/03_default_2ep > $R/03_default_2ep.log 2>&1
echo "03_default_2ep rc=$? wall=$(( $(date +%s) - s ))s" >> $R/status.txt
echo "total $(( $(date +%s) - T0 ))s" >> $R/status.txt
