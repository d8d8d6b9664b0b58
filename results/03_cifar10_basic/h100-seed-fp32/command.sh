#!/usr/bin/env bash
# 03 seed recipe (ds_config.json: batch 4, fp32, 2 epochs), real CIFAR-10 as JPEGs, one H100
# Run from the repository root; RUN_DIR sets the output folder. repeats: 3, seeds: 1 2 42
deepspeed --num_gpus=1 03_cifar10_basic/train_ds.py --deepspeed --dataset imagefolder --data-dir /tmp/cifar10-jpeg \
  --deepspeed_config 03_cifar10_basic/ds_config.json --seed "${SEED:-42}" --output-dir "${RUN_DIR:-runs/03-seed-fp32}"
