#!/usr/bin/env bash
# 02 seed recipe (ds_config.json: batch 32, fp32, 50 epochs), real CIFAR-10 as JPEGs, one H100
# Run from the repository root; RUN_DIR sets the output folder.
deepspeed --num_gpus=1 02_cifar10/train_ds.py --dataset imagefolder --data-dir /tmp/cifar10-jpeg \
  --output-dir "${RUN_DIR:-runs/02-seed-fp32}"
