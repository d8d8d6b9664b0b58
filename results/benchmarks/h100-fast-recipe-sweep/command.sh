#!/usr/bin/env bash
# One run of the sweep: 02 fast recipe with fused SGD, EPOCHS and SEED set by sweep.sh.
# Run from the repository root; RUN_DIR sets the output folder.
deepspeed --num_gpus=1 02_cifar10/train_ds.py --dataset imagefolder --data-dir /tmp/cifar10-jpeg \
  --deepspeed_config results/benchmarks/h100-fast-recipe-sweep/ds_config_fast_fused.json \
  --epochs "${EPOCHS:-50}" --label-smoothing 0.1 --tta-flip --seed "${SEED:-42}" \
  --output-dir "${RUN_DIR:-runs/02-fast-fused}"
