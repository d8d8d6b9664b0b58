#!/usr/bin/env bash
# Session-4 GPU command C (results/gpu/h100_s4c/cmd.sh): 02's default config (seed 002's recipe), full 50 epochs, alone.
set -u
R=/tmp/r4c; mkdir -p $R
export PYTHONPYCACHEPREFIX=/tmp/pyc
s=$(date +%s)
timeout 545 python3 02_cifar10/train_ds.py --dataset imagefolder --data-dir /tmp/cifar10-jpeg \
  --deepspeed_config 02_cifar10/ds_config.json --output-dir $R/02_default > $R/02_default.log 2>&1
echo "02_default rc=$? wall=$(( $(date +%s) - s ))s" >> $R/status.txt
rm -rf $R/02_default/checkpoints
tar -czf $OUT/s4c.tgz -C $R .
cp $R/status.txt $OUT/
