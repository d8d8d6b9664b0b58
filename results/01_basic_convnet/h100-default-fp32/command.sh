#!/usr/bin/env bash
# 01 default recipe with --dtype fp32 (ZeRO-1 as the config says), generated data, one H100, alone on the GPU
# Run from the repository root; RUN_DIR sets the output folder.
deepspeed --num_gpus=1 01_basic_convnet/train_ds.py --dtype fp32 --output-dir "${RUN_DIR:-runs/01-default-fp32}"
