#!/usr/bin/env bash
# 02 fast recipe (ds_config_fast.json: batch 512, fused SGD; 50 epochs), real CIFAR-10 as JPEGs, one H100
# Run from the repository root; RUN_DIR sets the output folder. repeats: 3, seeds: 1 2 42
deepspeed --num_gpus=1 02_cifar10/train_ds.py --dataset imagefolder --data-dir /tmp/cifar10-jpeg \
  --deepspeed_config 02_cifar10/ds_config_fast.json --epochs 50 --label-smoothing 0.1 --tta-flip \
  --seed "${SEED:-42}" --output-dir "${RUN_DIR:-runs/02-fast-fp32}"
