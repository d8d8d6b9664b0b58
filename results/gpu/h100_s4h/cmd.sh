#!/usr/bin/env bash
# Session-4 GPU command H (results/gpu/h100_s4h/cmd.sh): A/B on one machine of the scripts' own gradient
# clipping. new = 02_cifar10/train_ds.py at 2fc5019 (clips with its own global norm); old = the same file
# at f37d3c9 (DeepSpeed's fp32 clip_grad_norm_), saved first with
#   git show f37d3c9:02_cifar10/train_ds.py > .gpu/ab_old_02.py Default config (batch 32,
# clipping 1.0), 2 epochs each, interleaved, on 2 cores and on all cores; epoch 2's epoch_time_s is compared.
set -u
R=/tmp/r4h; mkdir -p $R
unset PYTHONDONTWRITEBYTECODE; export PYTHONPYCACHEPREFIX=/tmp/pyc4h
python3 -c 'import torch, torchvision.io, deepspeed, matplotlib.pyplot' > /dev/null 2>&1
for cores in 2 all; do
  pin=""; [ $cores = 2 ] && pin="taskset -c 0,1"
  for i in 1 2; do
    for v in new old; do
      s=02_cifar10/train_ds.py; [ $v = old ] && s=.gpu/ab_old_02.py
      $pin python3 $s --dataset imagefolder --data-dir /tmp/cifar10-jpeg --deepspeed_config 02_cifar10/ds_config.json \
        --epochs 2 --output-dir $R/${v}_${cores}_$i > $R/${v}_${cores}_$i.log 2>&1
      echo "cores $cores run $i $v rc=$? epoch2 $(python3 -c "import json; e = json.load(open('$R/${v}_${cores}_$i/metrics.json'))['epochs'][1]; print(f\"{e['epoch_time_s']:.2f} s, {1000 * e['epoch_time_s'] / 1563:.2f} ms/step, test {e['test_accuracy']:.2f}%\")")" >> $R/status.txt
    done
  done
done
rm -rf $R/*/checkpoints $R/*/model.pt $R/*/curves.png
tar -czf $OUT/s4h.tgz -C $R .
cp $R/status.txt $OUT/
