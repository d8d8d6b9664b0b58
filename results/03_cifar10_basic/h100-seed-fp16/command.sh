#!/usr/bin/env bash
# 03 seed recipe with ds_config_fp16.json (fp16, ZeRO-1), real CIFAR-10 as JPEGs, one H100
# Run from the repository root; RUN_DIR sets the output folder.
deepspeed --num_gpus=1 03_cifar10_basic/train_ds.py --deepspeed --dataset imagefolder --data-dir /tmp/cifar10-jpeg \
  --deepspeed_config 03_cifar10_basic/ds_config_fp16.json --output-dir "${RUN_DIR:-runs/03-seed-fp16}"
