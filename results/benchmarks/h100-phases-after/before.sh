#!/usr/bin/env bash
# the fast recipe as it stood before (50805c1, where the before table was measured: unfused SGD, 80 epochs), from a copy of that script
deepspeed --num_gpus=1 .gpu/bench/02before/train_ds.py --dataset imagefolder --data-dir /tmp/cifar10-jpeg-old \
  --deepspeed_config .gpu/bench/02before/ds_config_fast.json --epochs 80 --label-smoothing 0.1 --tta-flip \
  --output-dir "$RUN_DIR"
