#!/usr/bin/env bash
# phases.py runs this with RUN_DIR=.../runs/<k>: run k trains seed 1, 2 or 42 of the fast recipe.
k=$(basename "$RUN_DIR"); seeds=(1 2 42)
deepspeed --num_gpus=1 02_cifar10/train_ds.py --dataset imagefolder --data-dir /tmp/cifar10-jpeg \
  --deepspeed_config 02_cifar10/ds_config_fast.json --epochs 50 --label-smoothing 0.1 --tta-flip \
  --seed "${seeds[$((k - 1))]}" --output-dir "$RUN_DIR"
