#!/usr/bin/env bash
# Session-3 GPU command 1: accuracy runs that may share the GPU (timings from here are NOT alone).
set -u
R=$OUT/runs; mkdir -p $R; D=/tmp/cifar10-jpeg
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $OUT/hw.txt
nproc >> $OUT/hw.txt
T0=$(date +%s)
ex() { local name=$1 lim=$2; shift 2; ( s=$(date +%s); timeout $lim python3 "$@" --output-dir $R/$name > $R/$name.log 2>&1; echo "$name rc=$? wall=$(( $(date +%s) - s ))s" >> $OUT/status.txt ) ; }
mkcfg() { python3 - "$@" <<'PY'
import json, sys
src, dst, kv = sys.argv[1], sys.argv[2], sys.argv[3:]
c = json.load(open(src))
for item in kv:
    k, v = item.split("=")
    path = k.split("."); d = c
    for p in path[:-1]: d = d[p]
    d[path[-1]] = json.loads(v)
json.dump(c, open(dst, "w"), indent=1)
PY
}
F=02_cifar10/ds_config_fast.json
mkcfg $F /tmp/fast_lr02.json optimizer.params.lr=0.2
mkcfg $F /tmp/fast_b256.json train_micro_batch_size_per_gpu=256 optimizer.params.lr=0.05
mkcfg $F /tmp/fast_wd1e3.json optimizer.params.weight_decay=0.001
I02="02_cifar10/train_ds.py --dataset imagefolder --data-dir $D"
I03="--dataset imagefolder --data-dir $D"
# P1: seed recipe, 50 epochs
ex 02_default 500 $I02 --epochs 50 &
# P2: fast-recipe selection on a 5,000-image validation split
( ex 02_val_b512_lr01_e80 250 $I02 --deepspeed_config $F --epochs 80 --label-smoothing 0.1 --tta-flip --val-split 5000 &
  ex 02_val_b512_lr02_e80 250 $I02 --deepspeed_config /tmp/fast_lr02.json --epochs 80 --label-smoothing 0.1 --tta-flip --val-split 5000 &
  ex 02_val_b512_wd1e3_e80 250 $I02 --deepspeed_config /tmp/fast_wd1e3.json --epochs 80 --label-smoothing 0.1 --tta-flip --val-split 5000 &
  ex 02_val_b256_lr005_e50 250 $I02 --deepspeed_config /tmp/fast_b256.json --epochs 50 --label-smoothing 0.1 --tta-flip --val-split 5000 &
  wait
  # P5: precision on the fast recipe (full train set, 30 epochs)
  ex 02_fast30_fp32 150 $I02 --deepspeed_config $F --epochs 30 --label-smoothing 0.1 &
  ex 02_fast30_bf16 150 $I02 --deepspeed_config $F --epochs 30 --label-smoothing 0.1 --dtype bf16 &
  ex 02_fast30_fp16 150 $I02 --deepspeed_config $F --epochs 30 --label-smoothing 0.1 --dtype fp16 &
  wait ) &
# P3: 03 at the seed's command line, 2 epochs, each config
( for c in ds_config ds_config_zero2 ds_config_fp16; do
    ex 03_${c#ds_config}_2ep 480 03_cifar10_basic/train_ds.py --deepspeed --deepspeed_config 03_cifar10_basic/$c.json $I03 &
  done; wait ) &
# P4: parity against plain PyTorch on the GPU
( for x in "01_basic_convnet fp16" "01_basic_convnet bf16" "02_cifar10 bf16" "02_cifar10 fp16" "03_cifar10_basic fp16 --config 03_cifar10_basic/ds_config_fp16.json" "03_cifar10_basic bf16"; do
    set -- $x; timeout 120 python3 tests/parity_check.py $1 --dtype $2 --steps 16 ${3:-} ${4:-} > $R/parity_$1_$2.log 2>&1
    echo "parity $1 $2 rc=$? $(tail -n1 $R/parity_$1_$2.log)" >> $OUT/status.txt
  done ) &
wait
echo "total $(( $(date +%s) - T0 ))s" >> $OUT/status.txt
