#!/usr/bin/env bash
# 01 default recipe (ds_config.json: fp16, ZeRO-1) over seeds 1, 2, 42, generated data, one H100
# Run from the repository root; RUN_DIR sets the output folder. repeats: 3, seeds: 1 2 42
deepspeed --num_gpus=1 01_basic_convnet/train_ds.py --seed "${SEED:-42}" --output-dir "${RUN_DIR:-runs/01-default-fp16}"
